"""Routers: Arrow prototypes against a dense SVD and PEFT's Arrow; the linear router's
rules; and SGD routing learning an input-dependent choice (and resuming exactly)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from lorafuse.errors import LorafuseError
from lorafuse.factors import StackedModule
from lorafuse.fit.sgd import SGDSettings, train
from lorafuse.layer import FusedLoRALinear
from lorafuse.library import ExpertLibrary
from lorafuse.mixers.routers import (
    ArrowRouter,
    LinearRouter,
    arrow_prototypes,
    build_routers,
    router_parameters,
    set_top_k,
)
from lorafuse.model import attach
from tests.conftest import LLAMA_TARGETS, load_base, make_adapter


def test_prototypes_equal_dense_top_singular_vector(llama_experts):
    lib = ExpertLibrary.load(llama_experts)  # mixed ranks: zero-padded experts included
    for mod in lib.modules.values():
        v = arrow_prototypes(mod)  # (N, D)
        for i in range(len(lib)):
            dW = mod.scale[i].double() * mod.B[i].double() @ mod.A[i].double()  # (O, D)
            top = torch.linalg.svd(dW).Vh[0]  # (D,)
            sign = torch.sign(v[i].double() @ top)
            torch.testing.assert_close(v[i].double(), sign * top, atol=1e-5, rtol=0)
        rescaled = StackedModule(mod.A, mod.B, mod.scale * 7.5, mod.rank)
        torch.testing.assert_close(arrow_prototypes(rescaled), v)  # scaling: same vector
    zero = StackedModule(torch.zeros(2, 3, 5), torch.randn(2, 4, 3), torch.ones(2), torch.ones(2))
    assert arrow_prototypes(zero).abs().max() == 0  # a zero product: a zero prototype


class _Softmaxes(TorchFunctionMode):
    """Records the (tokens, N) softmax outputs: PEFT's Arrow coefficients, in call order."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax" and out.dim() == 2 and out.shape[1] == self.n:
            self.seen.append(out.detach().clone())
        return out


@pytest.fixture(scope="module")
def gapped_experts(llama_dir, tmp_path_factory):
    """Equal-rank experts (PEFT's Arrow needs that) whose B A has a clear top singular value."""
    root = tmp_path_factory.mktemp("gapped")
    dirs = []
    for i, alpha in enumerate([8, 16, 4]):
        d = make_adapter(llama_dir, root / f"x{i}", 500 + i, LLAMA_TARGETS, r=4, lora_alpha=alpha)
        sd = load_file(d / "adapter_model.safetensors")
        for k in sd:
            if "lora_B" in k:
                sd[k][:, 1:] *= 0.1  # a dominant first direction
        save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (3, 0.5)])
def test_against_peft_arrow(llama_dir, gapped_experts, tokens, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    peft = create_arrow_model(load_base(llama_dir), [str(d) for d in gapped_experts], cfg).eval()
    inputs, outputs = [], {}
    wrapped = {}
    for name, m in peft.named_modules():
        if hasattr(m, "lora_arrow"):
            short = name.removeprefix("base_model.model.")
            wrapped[short] = m
            m.register_forward_pre_hook(lambda mod, a, n=short: inputs.append((n, a[0])))
            m.register_forward_hook(lambda mod, a, y, n=short: outputs.__setitem__(n, y))
    with torch.no_grad(), _Softmaxes(len(gapped_experts)) as seen:
        ref = peft(tokens).logits
    lib = ExpertLibrary.load(gapped_experts)
    assert set(wrapped) == set(lib.modules) and len(seen.seen) == len(inputs)
    model = load_base(llama_dir)
    fusion = attach(model, lib, "deltas")
    ours = {}
    for name, layer in fusion.layers.items():
        protos = wrapped[name].lora_arrow["arrow_router"].prototypes  # (N, D), 15 power steps
        cos = torch.nn.functional.cosine_similarity(protos, arrow_prototypes(lib.modules[name]))
        assert cos.abs().min() > 1 - 1e-4, (name, cos)
        layer.mixer = ArrowRouter(protos, top_k, temperature)  # the same prototypes
        layer.register_forward_hook(lambda mod, a, y, n=name: ours.__setitem__(n, y))
    with torch.no_grad():
        logits = model(tokens).logits
        for (name, x), coefficients in zip(inputs, seen.seen):
            mine = fusion.layers[name].mixer(x).reshape(-1, len(lib))  # (B*T, N)
            torch.testing.assert_close(mine, coefficients, atol=1e-5, rtol=0)
    for name in lib.modules:
        torch.testing.assert_close(ours[name], outputs[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_router_rules():
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    x = torch.randn(2, 3, 8, generator=g)  # (B, T, D)
    scores = (x @ protos.T).abs()  # (B, T, N)
    dense = torch.softmax(scores / 0.7, -1)
    torch.testing.assert_close(ArrowRouter(protos, None, 0.7)(x), dense)
    torch.testing.assert_close(ArrowRouter(protos, 5, 0.7)(x), dense)  # k = N is dense
    top2 = ArrowRouter(protos, 2)(x)
    assert ((top2 > 0).sum(-1) == 2).all() and torch.allclose(top2.sum(-1), torch.ones(2, 3))
    assert torch.equal(ArrowRouter(-protos, 2)(x), top2)  # sign of a prototype: irrelevant
    uniform = LinearRouter(8, 5)(x)
    torch.testing.assert_close(uniform, torch.full((2, 3, 5), 0.2))  # zero init: uniform
    arrow_init = LinearRouter(8, 5, init=protos, temperature=0.7)
    torch.testing.assert_close(arrow_init(x), dense)  # Arrow init: exactly dense Arrow
    learned = LinearRouter(8, 5, init=torch.randn(5, 8, generator=g), absolute=False)
    full = learned(x)
    learned.top_k = 5
    torch.testing.assert_close(learned(x), full)  # k = N is dense
    set_top_k({"m": learned}, 1)
    assert torch.equal(learned(x).argmax(-1), full.argmax(-1))
    assert (learned(x).max(-1).values == 1).all()  # top-1: all weight on the largest
    with pytest.raises(LorafuseError, match="k=6"):
        LinearRouter(8, 5, top_k=6)
    with pytest.raises(LorafuseError, match="temperature"):
        ArrowRouter(protos, 2, 0.0)
    with pytest.raises(LorafuseError, match=r"\(5, 8\)"):
        LinearRouter(8, 5, init=torch.zeros(4, 8))


def test_projection_then_from_projection_is_the_router():
    # What the fused layer relies on to compute a router's projection in its own GEMM.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)
    routers = [
        ArrowRouter(torch.randn(5, 8, generator=g), 2, 0.7),
        ArrowRouter(torch.randn(5, 8, generator=g)),
        LinearRouter(8, 5, init=torch.randn(5, 8, generator=g)),
        LinearRouter(8, 5, init=torch.randn(5, 8, generator=g), absolute=False, top_k=3),
    ]
    for r in routers:
        assert r.projection.shape == (5, 8)
        torch.testing.assert_close(r.from_projection(x @ r.projection.T), r(x))
    lin = routers[2]
    assert lin.projection is lin.weight  # gradients reach the parameter itself


def test_router_on_one_expert_reproduces_it(llama_dir, llama_experts, tokens):
    from peft import PeftModel

    lib = ExpertLibrary.load(llama_experts)
    for space in ("factors", "deltas"):
        model = load_base(llama_dir)
        fusion = attach(model, lib, space)
        routers = build_routers(lib, "cpu", "linear")
        assert set(routers) == set(fusion.layers)
        fusion.set_mixers(routers)
        with torch.no_grad():
            for r in routers.values():
                r.weight.normal_()  # input-dependent logits, but the bias dominates
                r.bias.copy_(torch.tensor([0.0, 0.0, 1e4, 0.0]))
            ours = model(tokens).logits
        ref = PeftModel.from_pretrained(load_base(llama_dir), llama_experts[2]).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours, ref(tokens).logits, atol=1e-5, rtol=0)
    with pytest.raises(LorafuseError, match="unknown router init"):
        build_routers(lib, "cpu", "linear", init="random")


def _pico_problem(n, seed):
    """Tokens from two clusters; the target applies the cluster's own expert (N = 2)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2, (n,), generator=g)  # (n,)
    means = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0]])  # (2, D)
    return means[c] + 0.5 * torch.randn(n, 6, generator=g), c  # (n, D), (n,)


def _pico_layer():
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(6, 5)
    stacked = StackedModule(
        A=torch.randn(2, 2, 6, generator=g), B=torch.randn(2, 5, 2, generator=g),
        scale=torch.tensor([1.0, 2.0]), rank=torch.tensor([2, 2]),
    )  # fmt: skip
    layer = FusedLoRALinear(base, stacked, "factors", "pico")
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _fit_pico(settings, checkpoint=None, progress=None):
    layer = _pico_layer()
    X, c = _pico_problem(128, 0)
    Xv, cv = _pico_problem(64, 1)
    with torch.no_grad():  # targets: each token through its cluster's expert alone
        Y = layer.base(X) + layer.delta(X, torch.nn.functional.one_hot(c, 2).float())
        Yv = layer.base(Xv) + layer.delta(Xv, torch.nn.functional.one_hot(cv, 2).float())
    routers = {"pico": LinearRouter(6, 2)}
    layer.mixer = routers["pico"]

    def loss_fn(idx):
        return ((layer(X[idx]) - Y[idx]) ** 2).mean()

    def validate():
        with torch.no_grad():
            return float(((layer(Xv) - Yv) ** 2).mean())

    start = validate()
    res = train(router_parameters(routers), loss_fn, 128, settings, validate, checkpoint, progress)
    return start, res, routers["pico"], Xv, cv


def test_sgd_routing_learns_an_input_dependent_choice():
    start, res, router, Xv, cv = _fit_pico(SGDSettings(lr=0.1, epochs=6, batch_size=16))
    assert res.best_val < 0.05 * start
    with torch.no_grad():
        router.load_state_dict({k.removeprefix("pico."): v for k, v in res.state.items()})
        picked = router(Xv).gather(-1, cv[:, None])  # (n, 1): weight on the right expert
    assert picked.mean() > 0.9


def test_resume_gives_the_same_router(tmp_path):
    settings = SGDSettings(lr=0.1, epochs=3, batch_size=16, eval_every=5)
    _, uninterrupted, *_ = _fit_pico(settings)

    def stop(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    ckpt = tmp_path / "router.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit_pico(settings, ckpt, stop)
    _, resumed, *_ = _fit_pico(settings, ckpt)
    assert resumed.steps == uninterrupted.steps == 24
    for k, v in uninterrupted.state.items():
        torch.testing.assert_close(resumed.state[k], v, atol=1e-6, rtol=0)
