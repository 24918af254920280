// AVX2 + FMA instance of the kernel (kernel_impl.h), chosen at run time when the CPU has
// it and lacks AVX-512. Only plain C headers come before the target pragma (see isa_kernel.h).
#include <cstdint>

#include "isa_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define HCS_W 8
#define HCS_QK_MR 3
#define HCS_QK_NV 4
#define HCS_PV_MR 3
#define HCS_PV_NV 4
#define HCS_KERNEL_FN kernel_avx2
#define HCS_ISA_NAME "avx2"
#include "kernel_impl.h"
#pragma GCC pop_options
#else
namespace hcs_cpu {
const IsaKernel* kernel_avx2() { return nullptr; }
}  // namespace hcs_cpu
#endif
