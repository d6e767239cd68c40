#include "cpu_features.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *const NAMES[CPU_ISA_COUNT] = {"ref", "avx2", "avx512"};

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* XCR0 (which register states the OS saves on a context switch); only valid when CPUID says
 * OSXSAVE. Encoded as bytes so no -mxsave flag is needed for this file. */
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

cpu_isa_t cpu_isa_detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return CPU_ISA_REF;
    const int fma = (c >> 12) & 1, popcnt = (c >> 23) & 1, osxsave = (c >> 27) & 1;
    const int avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx && fma && f16c && popcnt))
        return CPU_ISA_REF;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* XMM and YMM state */
        return CPU_ISA_REF;
    if (__get_cpuid_max(0, NULL) < 7)
        return CPU_ISA_REF;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1;
    if (!avx2)
        return CPU_ISA_REF;
    const int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    const int vnni = (c >> 11) & 1;
    const int zmm_state = (xcr0 & 0xe6) == 0xe6; /* opmask, ZMM_Hi256, Hi16_ZMM */
    if (f && dq && bw && vl && vnni && zmm_state)
        return CPU_ISA_AVX512;
    return CPU_ISA_AVX2;
}
#else
cpu_isa_t cpu_isa_detect(void) {
    return CPU_ISA_REF;
}
#endif

const char *cpu_isa_name(cpu_isa_t isa) {
    return (unsigned)isa < CPU_ISA_COUNT ? NAMES[isa] : "?";
}

int cpu_isa_parse(const char *name, cpu_isa_t *isa, qerr_t *err) {
    for (int i = 0; i < CPU_ISA_COUNT; i++) {
        if (strcmp(name, NAMES[i]) == 0) {
            *isa = (cpu_isa_t)i;
            return 0;
        }
    }
    return qerr_set(err, QERR_INVALID, "unknown SIMD level '%s' (expected ref, avx2 or avx512)",
                    name);
}

int cpu_isa_select(cpu_isa_t *isa, qerr_t *err) {
    const cpu_isa_t best = cpu_isa_detect();
    const char *env = getenv(CPU_ISA_ENV);
    if (!env || !*env) {
        *isa = best;
        return 0;
    }
    cpu_isa_t want = CPU_ISA_REF;
    if (cpu_isa_parse(env, &want, err) != 0)
        return qerr_wrap(err, "environment variable %s", CPU_ISA_ENV);
    if (want > best)
        return qerr_set(err, QERR_INVALID, "%s=%s but this machine supports at most %s",
                        CPU_ISA_ENV, env, NAMES[best]);
    *isa = want;
    return 0;
}
