// Umbrella header of the C layer: kernel ABI + loader, MPI plugin ABI + loader, counter-based RNG,
// quantized block formats, OpenBLAS core check.
#include "relora_abi.h"
#include "relora_rng.h"
#include "relora_quant.h"
#include "relora_adam8.h"
#include "relora_blas_core.h"
#include "relora_mpi_abi.h"
