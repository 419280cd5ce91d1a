"""MoE all-to-all flag values on CPU: the value sequence of include/fusedcomm/kernels/
moe_a2a_flags.cuh, compiled here as a host program, never produces the abort mark (pushed or
not, on the low-precision wire or not) nor 0, also across the wrap of the 30-bit value field. The same wrap on GPUs is
tests/test_moe_a2a_recovery_gpu.py::test_rounds_across_the_flag_value_wrap."""

from host_program import run_host_program

ABORTED = 0xFFFFFFFF
PUSH = 0x80000000
LOW = 0x40000000


def _sequence(tmp_path, starts, steps):
    starts_cpp = ", ".join(f"{s}u" for s in starts)
    out = run_host_program(
        tmp_path,
        "flag_values",
        "#include <cstdint>\n#include <cstdio>\n"
        '#include "fusedcomm/kernels/moe_a2a_flags.cuh"\n'
        "int main() {\n"
        f"  const uint32_t starts[] = {{{starts_cpp}}};\n"
        "  for (uint32_t v : starts) {\n"
        f"    for (int i = 0; i < {steps}; ++i) {{\n"
        "      v = fusedcomm::next_flag_value(v);\n"
        '      std::printf("%u %u %u\\n", v, v | fusedcomm::kPushBit, v | fusedcomm::kLowBit);\n'
        "    }\n"
        "  }\n"
        '  std::printf("abort %u push %u low %u max %u\\n", fusedcomm::kA2AAborted, '
        "fusedcomm::kPushBit, fusedcomm::kLowBit, fusedcomm::kMaxFlagValue);\n"
        "  return 0;\n"
        "}\n",
    )
    lines = out.splitlines()
    tail = lines[-1].split()
    constants = dict(zip(tail[0::2], (int(x) for x in tail[1::2]), strict=True))
    pairs = [tuple(int(x) for x in line.split()) for line in lines[:-1]]
    return pairs, constants


def test_no_flag_value_equals_the_abort_mark_across_the_wrap(tmp_path):
    # Start a few values below the top of the 30-bit field (where the counter of a long-lived
    # workspace ends up after about 1e9 rounds) and walk through the wrap.
    starts = [LOW - 1 - d for d in range(6)] + [0]
    pairs, constants = _sequence(tmp_path, starts, 12)
    assert constants["abort"] == ABORTED and constants["push"] == PUSH
    assert constants["low"] == LOW
    assert len(pairs) == 12 * len(starts)
    for value, pushed, low in pairs:
        assert value != 0, "0 is the value of a fresh row and must never be a round's value"
        assert value < LOW, f"{value:#x} spills into the mode bits"
        assert pushed == value | PUSH and low == value | LOW
        for flag in (value, pushed, low, value | PUSH | LOW):
            assert flag != ABORTED, f"{flag:#x} collides with the abort mark"
    values = [v for v, _, _ in pairs]
    assert max(values) == constants["max"] == LOW - 2
    # The walk wraps to 1 right after the largest value and counts up from there.
    top = values.index(constants["max"])
    assert values[top + 1 : top + 4] == [1, 2, 3]
    assert constants["max"] | PUSH | LOW != ABORTED


def test_dispatch_flags_tell_steps_and_round_sizes_apart(tmp_path):
    # For dispatch values v around the wrap and a few R: the flag never is the abort mark nor
    # sets the push bit; the previous dispatch's flag (v - 1 or v - 2 before the wrap) is
    # another step; the same step with another R is a mismatch (same_step and unequal).
    out = run_host_program(
        tmp_path,
        "dispatch_flags",
        "#include <cstdint>\n#include <cstdio>\n"
        '#include "fusedcomm/kernels/moe_a2a_flags.cuh"\n'
        "using namespace fusedcomm;\n"
        "int main() {\n"
        "  const int64_t rs[] = {1, 2, 16, 17, 1024, 4096, (int64_t{1} << 23) - 1};\n"
        "  uint32_t prev2 = kMaxFlagValue - 9, prev = next_flag_value(prev2);\n"
        "  for (int i = 0; i < 24; ++i) {\n"
        "    const uint32_t v = next_flag_value(prev);\n"
        "    for (int64_t r : rs) {\n"
        "      const uint32_t f = dispatch_flag(v, r);\n"
        "      const uint32_t f1 = dispatch_flag(prev, r), f2 = dispatch_flag(prev2, r);\n"
        "      const uint32_t g = dispatch_flag(v, r + 1);\n"
        '      std::printf("%u %u %u %u %d %d %d %d\\n", f, f1, f2, g,\n'
        "                  same_step(f1, f, kStepMask), same_step(f2, f, kStepMask),\n"
        "                  same_step(g, f, kStepMask), same_step(kA2AAborted, f, kStepMask));\n"
        "    }\n"
        "    prev2 = prev;\n"
        "    prev = v;\n"
        "  }\n"
        "  return 0;\n"
        "}\n",
    )
    rows = [[int(x) for x in line.split()] for line in out.splitlines()]
    assert len(rows) == 24 * 7
    for f, f1, f2, g, step1, step2, step_g, step_abort in rows:
        for flag in (f, f1, f2, g):
            assert flag != ABORTED and not flag & (PUSH | LOW)
        assert f not in (f1, f2) and not step1 and not step2, "an earlier round looks current"
        assert g != f and step_g, "another R in the same step is not told apart"
        assert not step_abort, "the abort mark must read as an abort, not a mismatch"


def test_dispatch_flags_tell_active_masks_apart(tmp_path):
    # With the same step and R, every pair of distinct 16-bit masks gives another tag: a peer's
    # flag then is the same step with another tag, a mismatch. Checked for every mask against
    # a few others (all 2^16 masks, their neighbours one bit away and a fixed set) at several R.
    out = run_host_program(
        tmp_path,
        "mask_flags",
        "#include <cstdint>\n#include <cstdio>\n"
        '#include "fusedcomm/kernels/moe_a2a_flags.cuh"\n'
        "using namespace fusedcomm;\n"
        "int main() {\n"
        "  const int64_t rs[] = {1, 40, 4096, (int64_t{1} << 22) - 1};\n"
        "  long bad = 0, checked = 0;\n"
        "  for (int64_t r : rs) {\n"
        "    for (uint32_t m = 1; m < (1u << 16); ++m) {\n"
        "      const uint32_t f = dispatch_flag(7, r, m);\n"
        "      if (f == kA2AAborted || (f & (kPushBit | kLowBit))) ++bad;\n"
        "      for (int b = 0; b < 16; ++b) {\n"
        "        const uint32_t g = dispatch_flag(7, r, m ^ (1u << b));\n"
        "        ++checked;\n"
        "        if (g == f || !same_step(g, f, kStepMask)) ++bad;\n"
        "      }\n"
        "      const uint32_t h = dispatch_flag(7, r, 0xffffu & ~m);\n"
        "      ++checked;\n"
        "      if (h == f || !same_step(h, f, kStepMask)) ++bad;\n"
        "    }\n"
        "  }\n"
        '  std::printf("%ld %ld\\n", bad, checked);\n'
        "  return 0;\n"
        "}\n",
    )
    bad, checked = (int(x) for x in out.split())
    assert checked == 4 * 65535 * 17 and bad == 0
