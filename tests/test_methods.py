"""Methods (dfad, dafl, avkd), AVKD's prior data and discriminator, feature alignment: each term's sign and
direction, the hooks and the projection, bad settings in one line, the CIFAR paths on generated files."""
import pytest
import torch
import torch.nn.functional as F

from base import metrics as M
from base.errors import ConfigError, UserError
from conftest import run_main, tiny_values
from datasets import skip_md5, write_cifar10, write_cifar100
from trainable.akd import AKDRun
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import METHODS, build_config
from trainable.losses import FeatureProjector, FeatureTap, feature_loss
from trainable.models import CLASSIFIERS, Discriminator, build_classifier, build_generator, feature_layers
from trainable.priors import CIFAR100_VEHICLES, load_prior
from trainable.tasks import data_free, get_task


def random_teacher(seed=0):
    torch.manual_seed(seed)
    return build_classifier("cnn", 10, 1, 8).eval()


def make_run(data, teacher=None, **overrides):
    return AKDRun(build_config(tiny_values(**overrides)), teacher or random_teacher(), data, torch.device("cpu"))


# ------------------------------------------------------------------ the registry and its settings
def test_methods_set_their_terms_and_a_callers_value_wins():
    assert set(METHODS) == {"dfad", "dafl", "avkd"}
    dafl = build_config({"method": "dafl"})
    assert (dafl.w_onehot, dafl.w_activation, dafl.w_balance) == (1.0, 0.1, 5.0)
    assert build_config({"method": "dafl", "w_balance": 0.5}).w_balance == 0.5  # composable
    avkd = build_config({"method": "avkd"})
    assert (avkd.student_loss, avkd.generator_loss, avkd.prior) == ("kl", "neg_kl", "letters")
    assert build_config({"task": "cifar100", "method": "avkd"}).prior == "cifar10"  # the paper's pairing
    assert build_config({"task": "cifar10", "method": "avkd"}).prior == "cifar100"
    dfad = build_config({})
    assert (dfad.method, dfad.w_onehot, dfad.w_feature) == ("dfad", 0.0, 0.0)


@pytest.mark.parametrize("values, needle", [
    ({"method": "dkd"}, "method: unknown 'dkd'"),
    ({"task": "cifar100", "prior": "cifar100"}, "prior: cifar100 is the cifar100 teacher's own dataset"),
    ({"task": "cifar100", "prior": "cifar90"}, "prior: cifar90 is the cifar100 teacher's own dataset"),
    ({"task": "cifar10", "prior": "cifar10"}, "prior: cifar10 is the cifar10 teacher's own dataset"),
    ({"prior": "imagenet"}, "prior: unknown 'imagenet'"),
    ({"prior": "folder:"}, "prior: unknown 'folder:'"),
    ({"class_prior": [1, 2]}, "class_prior: expected 10 weights"),
    ({"w_feature": 1.0, "feature_layers": "features.2,nope"}, "'nope' is not a layer of the teacher cnn"),
    ({"w_feature": 1.0, "student": "lenet5", "task": "mnist", "feature_layers": "auto", "teacher": "resnet34"},
     "the teacher resnet34 has 4 and the student lenet5 3"),
    ({"w_discriminator": -1.0}, "w_discriminator: must be >= 0"),
    ({"n_discriminator": 0}, "n_discriminator: must be >= 1"),
])
def test_bad_method_settings_are_one_line(values, needle):
    with pytest.raises(ConfigError) as e:
        build_config(values)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["--method", "avkd", "--task", "cifar100", "--prior", "cifar100"], "teacher's own dataset"),
    (["--set", "method=dkd"], "method: unknown 'dkd'"),
    (["--set", "w_feature=1", "--set", "feature_layers=layer9"], "'layer9' is not a layer"),
    (["--method", "avkd", "--prior", "folder:/does/not/exist", "--set", "epochs=1"], "is not a folder"),
])
def test_cli_bad_method_settings_exit_2(tmp_path, args, needle):
    r = run_main("trainable/run_akd.py", "--out", tmp_path / "run", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_cli_unknown_method_flag_exits_2(tmp_path):
    r = run_main("trainable/run_akd.py", "--out", tmp_path / "run", "--method", "dkd")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ------------------------------------------------------------------ priors
def test_embedded_priors_are_shaped_and_normalised_like_the_teacher_inputs():
    letters = load_prior("letters", get_task("digits"))
    assert letters.shape == (4096, 1, 8, 8) and letters.dtype == torch.float32
    assert letters.min() >= -1.0 - 1e-6 and letters.max() <= 1.0 + 1e-6  # digits: (x - 0.5) / 0.5
    photos = load_prior("photos", get_task("cifar10"))
    assert photos.shape == (4096, 3, 32, 32) and abs(photos.mean().item()) < 1.5
    assert torch.equal(load_prior("letters", get_task("digits"), seed=0), letters)  # seeded


def test_cifar_priors_read_the_other_dataset_and_cifar90_drops_the_vehicles(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    write_cifar100(tmp_path, n_train=200)
    skip_md5(monkeypatch)
    with data_free():  # reading another dataset's training split is allowed inside the guard
        c10 = load_prior("cifar10", get_task("cifar100"), data_root=str(tmp_path))
        c100 = load_prior("cifar100", get_task("cifar10"), data_root=str(tmp_path))
        c90 = load_prior("cifar90", get_task("cifar10"), data_root=str(tmp_path))
    assert c10.shape == (60, 3, 32, 32) and c100.shape == (200, 3, 32, 32)
    vehicles = sum(1 for i in range(200) if i % 100 in CIFAR100_VEHICLES)
    assert c90.shape == (200 - vehicles, 3, 32, 32)
    with pytest.raises(UserError, match="needs its data"):
        load_prior("cifar10", get_task("cifar100"), data_root=None)


def test_folder_prior_reads_images_and_refuses_the_teachers_own_data(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 100, 200)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    x = load_prior(f"folder:{tmp_path / 'imgs'}", get_task("digits"))
    assert x.shape == (5, 1, 8, 8)
    x3 = load_prior(f"folder:{tmp_path / 'imgs'}", get_task("cifar10"))
    assert x3.shape == (5, 3, 32, 32)
    own = tmp_path / "data" / "cifar-100-python" / "pngs"
    own.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(own / "a.png")
    with pytest.raises(UserError, match="teacher's own dataset"):
        load_prior(f"folder:{own}", get_task("cifar100"), data_root=str(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable images"):
        load_prior(f"folder:{tmp_path / 'empty'}", get_task("digits"))


# ------------------------------------------------------------------ AVKD's terms, one at a time
def avkd_run(data, **weights):
    base = dict(method="avkd", w_disagreement=0.0, w_discriminator=0.0, w_class=0.0, w_bn=0.0, batch_size=64)
    return make_run(data, **{**base, **weights})


def fixed_batch(run, n=256):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, run.cfg.latent_dim, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_generators_discriminator_term_lowers_d_on_its_own_samples(digits_data):
    run = avkd_run(digits_data, w_discriminator=1.0, lr_generator=1e-2)
    z, y = fixed_batch(run)
    with torch.no_grad():
        before = run.discriminator(run.generator(z, y), y).mean().item()
    d_before = [p.clone() for p in run.discriminator.parameters()]
    for _ in range(3):
        run.generator_step()
    with torch.no_grad():
        after = run.discriminator(run.generator(z, y), y).mean().item()
    assert after < before
    assert all(torch.equal(a, b) for a, b in zip(d_before, run.discriminator.parameters()))  # D untouched


def test_the_class_term_makes_the_teacher_see_the_requested_class(digits_data, digits_teacher):
    run = avkd_run(digits_data, teacher=digits_teacher, w_class=1.0, lr_generator=1e-2)
    z, y = fixed_batch(run)

    def ce():
        with torch.no_grad():
            return F.cross_entropy(run.teacher(run.generator(z, y)), y).item()

    before = ce()
    for _ in range(5):
        run.generator_step()
    assert ce() < before


def test_the_discriminator_learns_generated_high_and_prior_low(digits_data):
    run = avkd_run(digits_data, lr_discriminator=1e-3)
    losses = [run.discriminator_step()[M.LOSS_DISCRIMINATOR] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    z, y = fixed_batch(run, 128)
    with torch.no_grad():
        fake = run.discriminator(run.generator(z, y), y).mean()
        prior = run.discriminator(run.prior[:128], y).mean()
    assert fake > prior


def test_an_avkd_epoch_reports_the_discriminator_and_resumes_exactly(tmp_path, digits_data):
    teacher = random_teacher()
    full = make_run(digits_data, teacher, method="avkd", w_feature=1.0, epochs=2).fit()
    assert set(full[0]) == set(M.EPOCH_METRICS) - {M.VAL_AGREEMENT}  # agreement: where selected on
    first = make_run(digits_data, teacher, method="avkd", w_feature=1.0, epochs=2)
    first.fit(max_epochs=1)
    save_checkpoint(first, tmp_path / "c.pt")
    torch.randn(1000)  # the resumed run must not depend on the global RNG in between
    second = make_run(digits_data, teacher, method="avkd", w_feature=1.0, epochs=2)
    second.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    strip = lambda h: [{k: v for k, v in m.items() if k != M.IMAGES_PER_S} for m in h]  # noqa: E731
    assert strip(second.fit()) == strip(full)


def test_conditional_generator_and_discriminator_shapes():
    g = build_generator("dfad", 16, 8, 3, 32, num_classes=100)
    x = g(torch.randn(4, 16), torch.tensor([0, 5, 99, 3]))
    assert x.shape == (4, 3, 32, 32)
    d = Discriminator(3, 100, 8)
    assert d(x, torch.tensor([0, 5, 99, 3])).shape == (4,)


def test_the_image_grid_has_a_row_per_class(tmp_path, digits_data):
    from PIL import Image

    from trainable.outputs import save_image_grid

    run = make_run(digits_data, method="avkd")
    save_image_grid(run, tmp_path / "g.png")
    w, h = Image.open(tmp_path / "g.png").size
    cell = 8 * 8 + 2  # 8x8 digits enlarged 8x, 2 px padding
    assert (w - 2) // cell == 10 and (h - 2) // cell == 10  # 10 columns, one row per class


# ------------------------------------------------------------------ feature alignment
def test_feature_loss_is_zero_on_equal_features_bounded_and_scale_free():
    a = torch.randn(4, 8, 3, 3)
    assert feature_loss([a], [a]).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss([a], [5 * a]).item() == pytest.approx(0.0, abs=1e-6)  # divided by the norm
    assert 0 < feature_loss([a], [torch.randn(4, 8, 3, 3)]).item() <= 4.0
    assert feature_loss([a], [-a]).item() == pytest.approx(4.0)
    s = torch.randn(4, 8, 6, 6, requires_grad=True)
    t = torch.randn(4, 8, 3, 3)  # other spatial size: pooled to the smaller
    loss = feature_loss([s], [t])
    loss.backward()
    with torch.no_grad():
        assert feature_loss([s - 0.5 * s.grad], [t]) < loss  # a step against the gradient lowers it


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_every_classifier_has_default_feature_layers_that_hook(name):
    task = {"lenet5": (1, 28), "cnn": (1, 8)}.get(name, (3, 32))
    model = build_classifier(name, 10, task[0], task[1]).eval()
    tap = FeatureTap(model, feature_layers(name, "auto"))
    tap.start()
    with torch.no_grad():
        model(torch.zeros(2, task[0], task[1], task[1]))
    feats = tap.collect()
    assert len(feats) == len(CLASSIFIERS[name].feature_layers) >= 3
    assert all(f.shape[0] == 2 for f in feats)


def test_projection_where_widths_differ_and_a_clear_error_without_it():
    t = [torch.Size([2, 64, 8, 8]), torch.Size([2, 128, 4, 4])]
    s = [torch.Size([2, 64, 8, 8]), torch.Size([2, 32, 4, 4])]
    p = FeatureProjector(s, t, project=True)
    assert isinstance(p.maps[0], torch.nn.Identity) and p.maps[1].weight.shape == (128, 32, 1, 1)
    out = p([torch.randn(s[0]), torch.randn(s[1])])
    assert [o.shape for o in out] == t
    with pytest.raises(ValueError, match="feature_projection: true"):
        FeatureProjector(s, t, project=False)


def test_feature_alignment_trains_the_projection_with_the_student(digits_data):
    run = make_run(digits_data, w_feature=1.0, student_width=0.25)
    assert run.projector is not None and any(isinstance(m, torch.nn.Conv2d) for m in run.projector.maps)
    before = [p.clone() for p in run.projector.parameters()]
    run.student_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, run.projector.parameters()))
    with pytest.raises(ConfigError, match="feature_projection: true"):
        make_run(digits_data, w_feature=1.0, student_width=0.25, feature_projection=False)


def test_adversarial_feature_term_raises_the_discrepancy(digits_data, digits_teacher):
    run = make_run(digits_data, teacher=digits_teacher, w_feature_adv=1.0, w_disagreement=0.0, w_bn=0.0,
                   lr_generator=1e-2, batch_size=64, student_width=0.5)
    z = torch.randn(256, run.cfg.latent_dim, generator=torch.Generator().manual_seed(1))

    def discrepancy():
        with torch.no_grad():
            x = run.generator(z)
            run.teacher_tap.start()
            run.teacher_fwd(x)
            t = run.teacher_tap.collect()
            run.student_tap.start()
            run.student(x)
            return feature_loss(run.projector(run.student_tap.collect()), t).item()

    before = discrepancy()
    for _ in range(5):
        run.generator_step()
    assert discrepancy() > before


# ------------------------------------------------------------------ CIFAR paths on generated files
def test_avkd_with_feature_alignment_on_cifar100_shapes(tmp_path, monkeypatch):
    """ResNet-34 teacher, ResNet-18 student (narrow), CIFAR-10 as prior, feature hooks on the four stages."""
    write_cifar10(tmp_path)
    skip_md5(monkeypatch)
    torch.manual_seed(0)
    teacher = build_classifier("resnet34", 100, 3, 32, 0.125).eval()
    empty = torch.zeros(2, 3, 32, 32)
    from trainable.tasks import EvalData

    data = EvalData(empty, torch.zeros(2, dtype=torch.long), empty, torch.zeros(2, dtype=torch.long))
    cfg = build_config({"task": "cifar100", "method": "avkd", "teacher": "resnet34_w", "student": "resnet18",
                        "student_width": 0.0625, "epochs": 1, "iters_per_epoch": 1, "batch_size": 4, "n_student": 1,
                        "latent_dim": 8, "generator_width": 4, "w_feature": 1.0, "w_feature_adv": 0.1,
                        "precision": "fp32"})
    with data_free():
        run = AKDRun(cfg, teacher, data, torch.device("cpu"), data_root=str(tmp_path))
        h = run.fit()
    assert run.prior.shape == (60, 3, 32, 32)
    assert len(run.teacher_tap.names) == 4 and len(run.projector.maps) == 4
    assert all(isinstance(m, torch.nn.Conv2d) for m in run.projector.maps)  # widths 8x apart
    assert M.LOSS_DISCRIMINATOR in h[0]
