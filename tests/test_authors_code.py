"""Agreement with the authors' released code: this repository's loss functions against figures the authors' own
loss code produced on seeded inputs (tests/fixtures/authors_<method>.json; only numbers are stored, no code).

Source of the figures (repository, commit, file and function are recorded in each fixture's "source"):
    ReSSL   https://github.com/KyleZheng1997/ReSSL (NeurIPS 2021 code), network/backbone.py, network/ressl.py,
            ressl.py train()
    ReCo    https://github.com/zhangyifei01/ReCo, reco/builder.py MoCo.forward / _img_interpolation, main_reco.py
    triplet https://github.com/wanggrun/triplet, openselfsup/models/heads/triplet_loss_head.py TripletLossHead
    SMoG    https://bopang1996.github.io/files/SMoG_code.zip (the first author's page), main_SMoG.py train(), M_step
HNPM has no released code, so nothing to compare.

Inputs are not stored: each case names a seed and its draws, regenerated here with torch.Generator (the "recipe" of
the fixture); a checksum of every input tells an RNG change apart from a loss mismatch. Tolerance: |ours - theirs|
<= 1e-6 + 1e-6 * |theirs| (absolute 1e-6, relative 1e-6 for the triplet losses of ~200), float32 on both sides.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import median_triplet
import reco
import ressl
import smog

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOL = dict(rtol=1e-6, atol=1e-6)


def fixture(method):
    with open(os.path.join(FIXTURES, f"authors_{method}.json")) as f:
        return json.load(f)


def inputs(case):
    """Regenerate the case's inputs by the fixture's recipe and check them against the stored checksums."""
    g = torch.Generator().manual_seed(case["seed"])
    out = {}
    for name, shape in case["draws"]:
        x = torch.randn(shape, generator=g)
        if name.startswith("queue"):
            x = F.normalize(x, dim=0)  # the authors' (dim, K) queue initialisation
        elif name.startswith("prototypes"):
            x = F.normalize(x, dim=1)
        out[name] = x
    for name, value in case["checksum"].items():
        assert out[name].double().sum().item() == pytest.approx(value, abs=1e-9), \
            f"torch.randn no longer reproduces input {name!r} of seed {case['seed']}: regenerate the fixture"
    return out


def close(actual, expected):
    torch.testing.assert_close(actual.detach().double(), torch.as_tensor(expected, dtype=torch.float64), **TOL)


def grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


# ----------------------------------------------------------------------------- ReSSL

@pytest.mark.parametrize("i", range(2))
def test_ressl_relation_loss_matches_authors(i):
    """The released loss is the cross-entropy -sum softmax(k.Q / t) log softmax(q.Q / 0.1), the same quantity as
    relation_loss (H(p^2, p^1), not the KL); q and k are normalised by the authors' BackBone, relation_loss does it
    itself, and the queue is their (dim, K) buffer, so ours gets its transpose."""
    case = fixture("ressl")["cases"][i]
    x = inputs(case)
    q = x["q"].requires_grad_(True)
    loss = ressl.relation_loss(q, x["k"], x["queue"].T, tau_s=case["params"]["student_t"], tau_t=case["params"]["t"])
    close(loss, case["loss"])
    close(grad(loss, q), case["grad_q"])


# ----------------------------------------------------------------------------- ReCo

@pytest.mark.parametrize("i", range(4))
def test_reco_losses_match_authors(i):
    case = fixture("reco")["cases"][i]
    x, p = inputs(case), case["params"]
    q, q_mix = x["q"].requires_grad_(True), x["q_mix"].requires_grad_(True)
    noise = torch.tensor(case["noise"])
    # L_csl: the authors' logits against their (dim, K) queue, MoCo temperature --moco-t 0.2 (their README command)
    csl = reco.infonce_loss(q, x["k"], x["queue"].T, tau=p["T"])
    close(csl, case["loss_moco"])
    # L_global: the authors minimise the cross-entropy H(S^t, S^o); global_relation_loss returns the KL of Eq. (3),
    # which is that cross-entropy minus the target entropy H(S^t), a constant (no gradient): the mapping, exactly
    glob = reco.global_relation_loss(q, x["k_w"], x["queue_w"].T, tau_ot=p["ST"], tau_tt=p["TT"])
    log_s_t = F.log_softmax(F.normalize(x["k_w"], dim=1) @ x["queue_w"] / p["TT"], dim=1)
    entropy_t = -(log_s_t.exp() * log_s_t).sum(dim=1).mean()
    close(glob + entropy_t, case["loss_global"])
    # Eq. (5): f_mix = l2(r q + (1 - r) k[noise]) of normalised features: --feature-pair q/k
    target = reco.interpolated_target(q, x["k"][noise], case["ratio"])
    if case["f_mix"] is not None:
        close(target, case["f_mix"])
    local = reco.local_interpolation_loss(q_mix, target, x["queue"].T, tau=p["T"])
    close(local, case["loss_local"])
    # Eq. (2) with the authors' lambdas (their default lambda2 is 1, the paper's 2: --lambda-local)
    total = reco.total_loss(csl, glob, local, p["lambda1"], p["lambda2"])
    close(total + p["lambda1"] * entropy_t, case["loss"])
    if "grad_loss_q" in case:
        close(grad(glob, q), case["grad_loss_global_q"])  # same gradient: the KL and the cross-entropy
        close(grad(total, q), case["grad_loss_q"])
        close(grad(total, q_mix), case["grad_loss_q_mix"])


class _Draws:
    """A random.Random stand-in that replays the authors' two np.random.randint draws (box centre: first the
    index along dim 2, then along dim 3, the same order as reco.cutmix's cy, cx)."""

    def __init__(self, values):
        self.values = list(values)

    def randrange(self, n):
        v = self.values.pop(0)
        assert 0 <= v < n
        return v


@pytest.mark.parametrize("i", range(2))
def test_reco_cutmix_matches_authors(i):
    """reco.cutmix with the authors' Beta draw and box centre gives their image and their ratio 1 - box area."""
    case = fixture("reco")["cutmix"][i]
    x = inputs(case)
    partner = x["im_k"][torch.tensor(case["noise"])]
    x_mix, r = reco.cutmix(x["im_q"], partner, case["beta_draw"], rng=_Draws(case["randint_draws"]))
    assert r == pytest.approx(case["ratio"], abs=1e-12)
    y0, x0, y1, x1 = case["bbox"]  # the authors' (bbx1, bby1, bbx2, bby2): dims 2 and 3
    expected = x["im_q"].clone()
    expected[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    assert torch.equal(x_mix, expected)
    weights = torch.arange(x_mix.numel(), dtype=torch.float64).view_as(x_mix)
    assert x_mix.double().sum().item() == pytest.approx(case["im_mix_sum"], abs=1e-9)
    assert (x_mix.double() * weights).sum().item() == pytest.approx(case["im_mix_weighted_sum"], rel=1e-12)


# ----------------------------------------------------------------------------- Median / rank-k triplet

@pytest.mark.parametrize("i", range(4))
def test_triplet_head_matches_authors(i):
    """The released head uses d = -2 cos and MarginRankingLoss(margin=100): relu(gamma d+ - d- + 100) with d = -2 cos
    is 2 relu(gamma d'+ - d'- + 50) with this repository's d' = -cos, so head(p, z) = 2 triplet_loss(margin=50).
    Negatives: "range" is the released mean of ranks 2..10 (--negatives range); "median" the file's commented-out
    dist[...].median(), torch's LOWER median, rank ceil(m / 2) = (m + 1) // 2 of m negatives, which is the default
    k = m // 2 for even m only."""
    case = fixture("median_triplet")["cases"][i]
    x = inputs(case)
    m = len(x["p1"]) - 1
    kw = dict(k_range=(2, 10)) if case["variant"] == "range" else dict(k=(m + 1) // 2)
    p1, p2 = x["p1"].requires_grad_(True), x["p2"].requires_grad_(True)
    h12 = 2 * median_triplet.triplet_loss(p1, x["z2"], gamma=2.0, margin=50.0, **kw)
    h21 = 2 * median_triplet.triplet_loss(p2, x["z1"], gamma=2.0, margin=50.0, **kw)
    close(h12, case["head_12"])
    close(h21, case["head_21"])
    close(h12 + h21, case["loss"])  # Triplet.forward_train sums the two directions, as this repository does
    close(grad(h12 + h21, p1), case["grad_p1"])
    if case["variant"] == "median":
        default = 2 * median_triplet.triplet_loss(x["p1"], x["z2"], gamma=2.0, margin=50.0)  # k = m // 2
        if m % 2 == 0:
            close(default, case["head_12"])
        else:  # odd m: torch's median is rank (m + 1) / 2, the default one rank harder
            assert not torch.allclose(default.double(), torch.tensor(case["head_12"], dtype=torch.float64), **TOL)


# ----------------------------------------------------------------------------- SMoG

@pytest.mark.parametrize("i", range(3))
def test_smog_step_matches_authors(i):
    """One iteration of the released train(): assign the online projections z to the old prototypes, M_step them
    (beta = C_momentum), contrast the online prediction p with the new, DETACHED prototypes (MultiPrototypes.forward
    detaches: --detach-groups) at the momentum features' assignment to the old prototypes. The released code keeps
    `heads` independent prototype sets (3 x 3000) and averages their losses; this repository has one set (no flag),
    so a multi-head case is checked as the mean of one smog_loss per set."""
    case = fixture("smog")["cases"][i]
    x = inputs(case)
    beta, tau = case["params"]["C_momentum"], case["params"]["temperature"]
    p = x["p"].requires_grad_(True)
    losses = []
    for h in range(case["heads"]):
        groups = x[f"prototypes{h}"]
        target = smog.assign_groups(x["z_k"], groups)
        assert target.tolist() == case["targets"][h]
        new = smog.update_groups(groups, x["z"], smog.assign_groups(x["z"], groups), beta)
        if case["new_prototypes"] is not None:
            close(new, case["new_prototypes"][h])
        losses.append(smog.smog_loss(p, new.detach(), target, tau))
    loss = torch.stack(losses).mean()
    close(loss, case["loss"])
    close(grad(loss, p), case["grad_p"])


def test_smog_detached_groups_is_the_released_gradient():
    """Without --detach-groups (the paper's synchronous grouping) the loss value is the released one but the loss
    also reaches the online projections z through the updated groups; with it, as released, it does not."""
    case = fixture("smog")["cases"][0]
    x = inputs(case)
    z = x["z"].requires_grad_(True)
    groups = x["prototypes0"]
    target = smog.assign_groups(x["z_k"], groups)
    new = smog.update_groups(groups, z, smog.assign_groups(z, groups), case["params"]["C_momentum"])
    attached = smog.smog_loss(x["p"], new, target, case["params"]["temperature"])
    close(attached, case["loss"])
    assert grad(attached, z).abs().sum() > 0
    detached = smog.smog_loss(x["p"], new.detach(), target, case["params"]["temperature"])
    assert not detached.requires_grad
