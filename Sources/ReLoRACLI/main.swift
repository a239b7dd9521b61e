print("relora")
