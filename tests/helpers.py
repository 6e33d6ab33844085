"""Tolerance rules of GLM_SPEC.md ("Tolerances for parity tests"), stated once and used beside each assertion."""


def max_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def scale_of(ref) -> float:
    return float(ref.detach().double().abs().max())


def assert_fp32_close(out, ref, rel, what=""):
    """fp32 rule: max abs error <= rel * max|ref| (rel 1e-5 element-wise ops, 1e-4 attention/blocks/models)."""
    err, scale = max_err(out, ref), scale_of(ref)
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} * scale {scale:.3e}"


def assert_lowp_close(out, ref_lowp, ref32, what=""):
    """fp16/bf16 rule: err(out, ref32) <= 2 * err(ref_lowp, ref32) + 1e-3 * max|ref32|."""
    err = max_err(out, ref32)
    ref_err = max_err(ref_lowp, ref32)
    bound = 2 * ref_err + 1e-3 * scale_of(ref32)
    assert err <= bound, f"{what}: error {err:.3e} > 2 * reference error {ref_err:.3e} + 1e-3 * scale"
