// printf into a std::string, for the emulation's error messages (cuda_emu.cpp, nccl_emu.cpp) and the kernel
// tests (harness.h). Messages are truncated at 1023 bytes.
#ifndef RELORA_EMU_FORMAT_H
#define RELORA_EMU_FORMAT_H

#include <stdarg.h>
#include <stdio.h>

#include <string>

namespace relora_emu_text {
inline std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}
}  // namespace relora_emu_text

#endif  // RELORA_EMU_FORMAT_H
