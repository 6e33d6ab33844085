"""Tolerance rules of GLM_SPEC.md ("Tolerances for parity tests"), stated once and used beside each assertion;
and the original's greedy loop on a tuple cache, used by several tests."""
import torch


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


@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens):
    """Greedy decoding with the original's tuple cache, feeding positions as its generation does."""
    cfg = model.config
    out = model(input_ids, use_cache=True)
    tokens = input_ids
    context = int((input_ids[0] == cfg.bos_token_id).nonzero()[0, 0])
    gmask = (input_ids[0] == cfg.gmask_token_id).nonzero()
    mask_position = int(gmask[0, 0]) if len(gmask) else int((input_ids[0] == cfg.mask_token_id).nonzero()[0, 0])
    for _ in range(max_new_tokens):
        next_token = out.logits[:, -1, :].float().argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, next_token), dim=1)
        if tokens.shape[1] - input_ids.shape[1] == max_new_tokens:
            break
        position_ids = torch.tensor([[[mask_position], [tokens.shape[1] - context]]] * tokens.shape[0])
        out = model(next_token, position_ids=position_ids, past_key_values=out.past_key_values, use_cache=True)
    return tokens
