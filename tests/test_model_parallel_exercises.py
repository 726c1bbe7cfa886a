"""Chapter 4's exercise checks (``utils.model_parallel.exercises``): each passes on
the solution the chapter prints and fails, with a message that says why, on the
plausible wrong answers. Exercises 4.1, 4.2 and 4.4 run the learner's file in 2
gloo ranks; 4.3 starts no process."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest

from labs.model_parallel import param_split as lab_param_split
from utils.model_parallel import exercises as ex
from utils.models import GPTConfig


def _write(tmp_path, name: str, code: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


# ------------------------------------------------------------------ 4.1
ROW_OK = """
    from torch.nn import functional as F
    from utils.model_parallel.comm import ReduceFromTP

    def row_parallel_forward(x, weight, bias, group):
        return ReduceFromTP.apply(F.linear(x, weight), group) + bias
"""

ROW_WRONG = {
    "bias_before_sum": (
        """
        from torch.nn import functional as F
        from utils.model_parallel.comm import ReduceFromTP

        def row_parallel_forward(x, weight, bias, group):
            return ReduceFromTP.apply(F.linear(x, weight, bias), group)
        """,
        "the bias is added 2 times",
    ),
    "no_sum": (
        """
        from torch.nn import functional as F

        def row_parallel_forward(x, weight, bias, group):
            return F.linear(x, weight) + bias
        """,
        "partial product alone",
    ),
    "mean": (
        """
        import torch.distributed as dist
        from torch.nn import functional as F
        from utils.model_parallel.comm import ReduceFromTP

        def row_parallel_forward(x, weight, bias, group):
            out = ReduceFromTP.apply(F.linear(x, weight), group)
            return out / dist.get_world_size(group) + bias
        """,
        "averaged",
    ),
    "gather": (
        """
        import torch
        import torch.distributed as dist
        from torch.nn import functional as F

        def row_parallel_forward(x, weight, bias, group):
            part = F.linear(x, weight)
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, part.contiguous())
            return torch.cat(parts, -1)
        """,
        "has shape",
    ),
    "plain_all_reduce": (
        """
        import torch.distributed as dist
        from torch.nn import functional as F

        def row_parallel_forward(x, weight, bias, group):
            out = F.linear(x, weight)
            dist.all_reduce(out, group=group)
            return out + bias
        """,
        "autograd backpropagated through a collective",
    ),
}


def test_4_1_passes_on_the_solution(tmp_path, capsys):
    ex.check_row_parallel(_write(tmp_path, "row_ok", ROW_OK))
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(ROW_WRONG))
def test_4_1_fails_on_wrong_answers(tmp_path, case):
    code, words = ROW_WRONG[case]
    with pytest.raises(AssertionError, match=words):
        ex.check_row_parallel(_write(tmp_path, case, code))


def test_4_1_names_a_missing_file(tmp_path):
    with pytest.raises(AssertionError, match="no file"):
        ex.check_row_parallel(tmp_path / "missing.py")


# ------------------------------------------------------------------ 4.2
G_HEAD = """
    import torch
    import torch.distributed as dist
"""
G_OK = (
    G_HEAD
    + """
    class G(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            out = x.clone()
            dist.all_reduce(out, group=group)
            return out

        @staticmethod
        def backward(ctx, grad):
            return grad, None
"""
)


def _g(forward: str, backward: str) -> str:
    body = textwrap.indent(textwrap.dedent(forward), " " * 12)
    back = textwrap.indent(textwrap.dedent(backward), " " * 12)
    return (
        G_HEAD
        + "\n    class G(torch.autograd.Function):\n"
        + "        @staticmethod\n        def forward(ctx, x, group):\n"
        + "            ctx.group = group\n"
        + body
        + "\n        @staticmethod\n        def backward(ctx, grad):\n"
        + back
    )


SUM = """
out = x.clone()
dist.all_reduce(out, group=group)
return out
"""

G_WRONG = {
    "backward_all_reduces": (
        _g(
            SUM, "g = grad.clone()\ndist.all_reduce(g, group=ctx.group)\nreturn g, None"
        ),
        "2 times too large",
    ),
    "backward_divides": (
        _g(SUM, "return grad / dist.get_world_size(ctx.group), None"),
        "divided by 2",
    ),
    "identity_forward": (
        _g("return x.view_as(x)", "return grad, None"),
        "identity forward of f",
    ),
    "in_place": (
        _g("dist.all_reduce(x, group=group)\nreturn x.clone()", "return grad, None"),
        "changed its input",
    ),
    "not_a_function": (
        G_HEAD
        + """
    def G(x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out
""",
        "not a subclass",
    ),
}


def test_4_2_passes_on_the_solution(tmp_path, capsys):
    ex.check_g(_write(tmp_path, "g_ok", G_OK))
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(G_WRONG))
def test_4_2_fails_on_wrong_answers(tmp_path, case):
    code, words = G_WRONG[case]
    with pytest.raises(AssertionError, match=words):
        ex.check_g(_write(tmp_path, case, code))


# ------------------------------------------------------------------ 4.3
def tp_costs(gpt, tp, batch_size, bytes_per_element=4):
    """The chapter's solution of exercise 4.3."""
    h, L, v, s = gpt.d_model, gpt.n_layers, gpt.vocab_size, gpt.seq_len
    matrices = 1 if gpt.tie_weights else 2
    sharded = L * (12 * h * h + 7 * h) + matrices * v * h
    replicated = L * 6 * h + s * h + 2 * h
    params = (sharded // tp + replicated) * bytes_per_element
    wire = 8 * batch_size * s * h * (tp - 1) // tp * bytes_per_element
    return params, wire


def test_4_3_passes_on_the_solution_and_the_reference(capsys):
    ex.check_tp_costs(tp_costs)
    ex.check_tp_costs(ex.tp_costs)
    assert capsys.readouterr().out.count("correct") == 2


def test_4_3_the_counted_split_equals_the_labs_formula():
    for gpt, *_ in ex.COST_CASES:
        assert ex.param_split(gpt) == lab_param_split(gpt)


def _all_divided(gpt, tp, b, e):
    params, wire = tp_costs(gpt, tp, b, e)
    sharded, replicated = ex.param_split(gpt)
    return (sharded + replicated) * e // tp, wire


def _forward_only(gpt, tp, b, e):
    return tp_costs(gpt, tp, b, e)[0], tp_costs(gpt, tp, b, e)[1] // 2


def _no_ring_factor(gpt, tp, b, e):
    wire = 0 if tp == 1 else 4 * b * gpt.seq_len * gpt.d_model * e
    return tp_costs(gpt, tp, b, e)[0], wire


def _always_untied(gpt, tp, b, e):
    untied = replace(gpt, tie_weights=False)
    return tp_costs(untied, tp, b, e)


def _no_element_size_on_wire(gpt, tp, b, e):
    return tp_costs(gpt, tp, b, e)[0], tp_costs(gpt, tp, b, 1)[1]


@pytest.mark.parametrize(
    "wrong, words",
    [
        (_all_divided, "not everything is divided by t"),
        (_forward_only, "two all-reduces"),
        (_no_ring_factor, "2 \\(t-1\\)/t"),
        (_always_untied, "parameter bytes"),
        (_no_element_size_on_wire, "bytes per layer"),
        (lambda gpt, tp, b, e: 0, "return \\(param_bytes, wire_bytes\\)"),
    ],
)
def test_4_3_fails_on_wrong_answers(wrong, words):
    with pytest.raises(AssertionError, match=words):
        ex.check_tp_costs(wrong)


def _fake_run(params_bytes, t=2):
    cfg = {
        "mode": "tensor",
        "vocab_size": 64,
        "seq_len": 16,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "tie_weights": False,
        "tp_size": 0,
        "world_size": t,
        "dp_size": 1,
        "precision": "fp32",
        "batch_size": 4,
    }
    extra = {"config": cfg, "state_bytes": {"params": params_bytes}}
    return [{"rank": r, "extra": extra} for r in range(t)]


def test_4_3_compares_with_measured_reports(capsys):
    gpt = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4,
                    tie_weights=False)  # fmt: skip
    right = tp_costs(gpt, 2, 4, 4)[0]
    ex.check_tp_costs(tp_costs, reports=[_fake_run(right)])
    assert "2 ranks' measured" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="measured"):
        ex.check_tp_costs(tp_costs, reports=[_fake_run(right + 4)])


# ------------------------------------------------------------------ 4.4
SP_HEAD = """
    import torch.distributed as dist
    from utils.model_parallel.layers import vocab_parallel_cross_entropy

    def sp_train_step(model, x, y, opt, group):
        opt.zero_grad()
        loss = vocab_parallel_cross_entropy(model(x), y, group)
        loss.backward()
"""
SP_TAIL = """
        opt.step()
        return loss.detach()
"""


def _sp(sync: str) -> str:
    return SP_HEAD + textwrap.indent(textwrap.dedent(sync), " " * 8) + SP_TAIL


SP_OK = _sp(
    """
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=group)
    """
)

SP_WRONG = {
    "chapter_snippet": _sp(
        """
        for name, p in model.named_parameters():
            if ".ln" in name:
                dist.all_reduce(p.grad, group=group)
                p.grad /= dist.get_world_size(group)
        """
    ),
    "no_sync": _sp("pass"),
    "layer_norms_only": _sp(
        """
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln_f"):
                dist.all_reduce(p.grad, group=group)
        """
    ),
    "mean_not_sum": _sp(
        """
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=group)
                p.grad /= dist.get_world_size(group)
        """
    ),
    "every_gradient": _sp(
        """
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        """
    ),
}


def test_4_4_passes_on_the_solution(tmp_path, capsys):
    ex.check_sp_step(_write(tmp_path, "sp_ok", SP_OK))
    assert "correct" in capsys.readouterr().out


def test_4_4_passes_with_the_courses_sync(tmp_path):
    code = _sp(
        """
        from utils.model_parallel.apply import sync_sequence_parallel_grads
        sync_sequence_parallel_grads(model, group)
        """
    )
    ex.check_sp_step(_write(tmp_path, "sp_course", code))


@pytest.mark.parametrize("case", sorted(SP_WRONG))
def test_4_4_fails_on_wrong_answers(tmp_path, case):
    with pytest.raises(AssertionError, match="differ from one process"):
        ex.check_sp_step(_write(tmp_path, case, SP_WRONG[case]))


def test_4_4_the_chapters_snippet_drifts_where_the_chapter_says(tmp_path):
    m = ex.measure_sp_step(_write(tmp_path, "snippet", SP_WRONG["chapter_snippet"]))
    kinds = m["by_kind"]
    for kind in ("layer norms", "row-parallel biases", "position embedding"):
        assert kinds[kind] > 1e-4, kinds
    assert max(m["spread"].values()) > 1e-4  # the replicas disagree
