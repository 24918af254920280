// Portable instance of the kernel (kernel_impl.h): the compiler's baseline target (SSE2 on
// x86-64, NEON on aarch64). Used where no wider instance fits the CPU.
#include <cstdint>

#include "isa_kernel.h"

#define HCS_W 4
#define HCS_QK_MR 6
#define HCS_QK_NV 2
#define HCS_PV_MR 6
#define HCS_PV_NV 2
#define HCS_KERNEL_FN kernel_generic
#define HCS_ISA_NAME "generic"
#include "kernel_impl.h"
