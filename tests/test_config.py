"""Strict recipe configs: unknown keys, overrides, types, loss binding, round trips, cross-field checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from diffalign import config, resources
from diffalign.config import ConfigError, OfflinePrefConfig
from diffalign.losses import dpo as dpo_module


BASE = {
    "model": {"family": "sd15", "path": "some/model"},
    "data": {"path": "/data/pairs"},
    "loss": {"name": "dpo", "beta": 2500},
    "run": {"output_dir": "runs/x", "max_steps": 100, "save_every": 50},
}

# A user loss module outside diffalign, reached by its dotted name (the escape hatch of losses.get).
FAKE_LIST_LOSS = '''
"""A fake list objective for config tests."""
from dataclasses import dataclass

TERMS = "list"
REQUIRES = frozenset({"ref"})


@dataclass(frozen=True, kw_only=True)
class Config:
    beta: float = 1.0
    weights: tuple[float, ...] = (1.0, 0.5)
    mode: str = "dcg"
'''


@pytest.fixture
def dpo():
    """The shipped Diffusion-DPO module (the tests bind its real ``Config``)."""
    return dpo_module


@pytest.fixture
def write(tmp_path):
    """Write a config dict (BASE with per-section updates, or raw text) to a YAML file and return its path."""

    def _write(updates: dict | None = None, text: str | None = None, name: str = "cfg.yaml") -> Path:
        path = tmp_path / name
        if text is not None:
            path.write_text(textwrap.dedent(text))
            return path
        data = {k: dict(v) for k, v in BASE.items()}
        for section, values in (updates or {}).items():
            if values is None:
                data.pop(section, None)
            else:
                data.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(data))
        return path

    return _write


@pytest.fixture
def fake_list_loss(tmp_path, monkeypatch):
    pkg = tmp_path / "userlosses"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ranky.py").write_text(FAKE_LIST_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userlosses.ranky"


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


def test_minimal_config_fills_defaults_and_types(write, dpo):
    cfg = config.load(write())
    assert isinstance(cfg, OfflinePrefConfig)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.lora.targets is None and cfg.lora.alpha is None  # None: the family's default targets
    assert cfg.validation == config.ValidationConfig()
    # loss params hold every Config field, type-coerced (2500 int -> 2500.0 float)
    assert cfg.loss.name == "dpo"
    assert cfg.loss.params == {"beta": 2500.0, "loss_type": "sigmoid"}
    assert isinstance(cfg.loss.params["beta"], float)


def test_unknown_key_names_dotted_key_file_and_suggestion(write, dpo):
    path = write({"optim": {"lrr": 1e-4}})
    msg = _error(path)
    assert "'optim.lrr'" in msg and str(path) in msg and "did you mean 'lr'?" in msg


def test_unknown_top_level_section(write, dpo):
    msg = _error(write({"modle": {"path": "x"}}))
    assert "unknown key 'modle'" in msg and "did you mean 'model'?" in msg


def test_unknown_key_from_override_names_the_override(write, dpo):
    msg = _error(write(), ["run.max_step=3"])
    assert "'run.max_steps'" not in msg.split(";")[0]
    assert "unknown key 'run.max_step'" in msg and "override 'run.max_step=3'" in msg
    assert "did you mean 'max_steps'?" in msg


def test_unknown_loss_param_override_suggests_beta(write, dpo):
    msg = _error(write(), ["loss.bta=1"])
    assert "'loss.bta'" in msg and "did you mean 'beta'?" in msg and "diffalign.losses.dpo.Config" in msg


def test_unknown_loss_param_in_file(write, dpo):
    path = write({"loss": {"betta": 10}})
    msg = _error(path)
    assert "'loss.betta'" in msg and str(path) in msg and "did you mean 'beta'?" in msg


def test_unknown_loss_name_suggests(write, dpo):
    msg = _error(write(), ["loss.name=dpoo"])
    assert "unknown loss 'dpoo'" in msg and "did you mean 'dpo'?" in msg


def test_loss_param_type_and_post_init_errors_name_key(write, dpo):
    assert "loss.beta" in _error(write(), ["loss.beta=big"])
    msg = _error(write(), ["loss.loss_type=ipo"])  # dpo.Config.__post_init__ rejects it
    assert msg.startswith("loss") and "ipo" in msg


def test_missing_loss_name(write, dpo):
    assert "missing required key 'loss.name'" in _error(write({"loss": None}))


def test_loss_config_binds_module_config(write, dpo):
    cfg = config.load(write(), ["loss.beta=1e3"])
    module, loss_cfg = config.loss_config(cfg.loss)
    assert module is dpo
    assert loss_cfg == dpo.Config(beta=1000.0)


def test_dotted_user_loss_module(write, fake_list_loss):
    cfg = config.load(write({"data": {"format": "ranked"}, "loss": {"name": fake_list_loss, "beta": 2}}))
    assert cfg.loss.params == {"beta": 2.0, "weights": [1.0, 0.5], "mode": "dcg"}
    module, loss_cfg = config.loss_config(cfg.loss)
    assert loss_cfg.weights == (1.0, 0.5)  # list in params, tuple again in the bound Config
    assert module.TERMS == "list"


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("optim.lr=1e-5", "optim", "lr", 1e-5),
        ("optim.lr=3", "optim", "lr", 3.0),
        ("optim.lr=2.5E-4", "optim", "lr", 2.5e-4),
        ("run.max_steps=7", "run", "max_steps", 7),
        ("lora.targets=[to_q,to_k]", "lora", "targets", ["to_q", "to_k"]),
        ("lora.targets=[to_q, to_out.0]", "lora", "targets", ["to_q", "to_out.0"]),
        ("run.resume_from=latest", "run", "resume_from", "latest"),
        ("run.resume_from=null", "run", "resume_from", None),
        ("validation.prompts=null", "validation", "prompts", []),
        ("validation.prompts=[a cat, 'a dog, running']", "validation", "prompts", ["a cat", "a dog, running"]),
        ("run.mixed_precision=no", "run", "mixed_precision", "no"),
        ("data.streaming=true", "data", "streaming", True),
        ("data.split=2024", "data", "split", "2024"),
        ("run.output_dir=1e-5", "run", "output_dir", "1e-5"),
        ("model.revision=0123", "model", "revision", "0123"),
        ("lora.alpha=16", "lora", "alpha", 16.0),
        ("lora.alpha=null", "lora", "alpha", None),
        ("optim.betas=[0.8, 0.95]", "optim", "betas", (0.8, 0.95)),
        ("optim.max_grad_norm=null", "optim", "max_grad_norm", None),
        ("run.report_to=[]", "run", "report_to", []),
        ("data.max_rows=100", "data", "max_rows", 100),
        ("model.family=sdxl", "model", "family", "sdxl"),
        ("validation.prompts_file=", "validation", "prompts_file", None),
    ],
)
def test_override_parsing(write, dpo, override, section, field, expected):
    value = getattr(getattr(config.load(write(), [override]), section), field)
    assert value == expected and type(value) is type(expected)


def test_later_override_wins_and_can_add_a_missing_section(write, dpo):
    cfg = config.load(
        write({"validation": None}), ["optim.lr=1", "optim.lr=2", "validation.every=5", "validation.prompts=[x]"]
    )
    assert cfg.optim.lr == 2.0 and cfg.validation.every == 5 and cfg.validation.prompts == ["x"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lr", "must look like section.key=value"),
        ("=3", "must look like"),
        ("optim..lr=3", "must look like"),
        ("model.path.x=1", "'model.path' is a value, not a section"),
    ],
)
def test_malformed_overrides(write, dpo, override, needle):
    assert needle in _error(write(), [override])


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("run.max_steps=ten", ["run.max_steps", "expected an integer", "'ten'"]),
        ("run.max_steps=1.5", ["run.max_steps", "expected an integer"]),
        ("run.max_steps=true", ["run.max_steps", "expected an integer"]),
        ("data.streaming=1", ["data.streaming", "expected true or false"]),
        ("optim.lr=fast", ["optim.lr", "expected a number"]),
        ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
        ("optim.betas=[0.9, x]", ["optim.betas[1]", "expected a number"]),
        ("lora.targets=to_q", ["lora.targets", "expected a list", "write [to_q]"]),
        ("lora.targets=[to_q, 3]", ["lora.targets[1]", "expected a string"]),
        ("model={family: sd15}", ["model.path", "missing required"]),
        ("optim=3", ["optim", "expected a section"]),
    ],
)
def test_type_errors_name_the_key(write, dpo, override, needles):
    msg = _error(write(), [override])
    for needle in needles:
        assert needle in msg


def test_type_error_in_file_names_key_and_file(write, dpo):
    path = write({"model": {"path": 5}})
    msg = _error(path)
    assert "model.path" in msg and str(path) in msg and "quote it" in msg


def test_literal_error_lists_choices(write, dpo):
    msg = _error(write(), ["model.family=sdx1"])
    assert "model.family" in msg and "did you mean 'sdxl'?" in msg and "sd15, sdxl, sd3" in msg
    msg = _error(write(), ["optim.scheduler=warmup_cosine_restarts"])
    assert "constant, constant_with_warmup, linear, cosine" in msg


def test_missing_required_fields_are_all_named(write, dpo):
    path = write({"run": None, "model": {"family": "sd15"}})
    path.write_text(path.read_text().replace("path: some/model\n", ""))
    msg = _error(path)
    for key in ("'model.path'", "'run.output_dir'", "'run.max_steps'"):
        assert f"missing required key {key}" in msg
    assert str(path) in msg


def test_null_does_not_unset_a_required_field(write, dpo):
    assert "run.max_steps" in _error(write(), ["run.max_steps=null"])


def test_all_problems_reported_at_once(write, dpo):
    msg = _error(write(), ["optim.lrr=1", "model.family=x", "loss.bta=2"])
    assert msg.startswith("3 problems")
    assert "optim.lrr" in msg and "model.family" in msg and "loss.bta" in msg


def test_yaml_12_scalars_and_duplicate_keys(write, dpo):
    text = """
        model: {family: sd15, path: m}
        data: {path: d, split: 2024-01-01}
        loss: {name: dpo}
        run: {output_dir: o, max_steps: 10, save_every: 5, mixed_precision: no}
        optim: {lr: 1e-4}
    """
    cfg = config.load(write(text=text))
    assert cfg.run.mixed_precision == "no" and cfg.data.split == "2024-01-01" and cfg.optim.lr == 1e-4
    dup = write(text=textwrap.dedent(text) + "optim: {lr: 1e-3}\n", name="dup.yaml")
    msg = _error(dup)
    assert "duplicate key 'optim'" in msg and "dup.yaml" in msg


def test_top_level_must_be_a_mapping(write):
    assert "must be a mapping" in _error(write(text="- a\n- b\n"))


def test_dump_load_round_trip(write, dpo, tmp_path):
    overrides = [
        "optim.lr=3e-6",
        "optim.betas=[0.8, 0.99]",
        "lora.alpha=4",
        "run.output_dir=1e-5",  # a string our loader would otherwise read as a float
        "data.split=yes",  # a string YAML 1.1 readers would read as a bool
        "validation.prompts=[a cat, 'null']",
        "validation.every=10",
        "run.report_to=[tensorboard, wandb]",
    ]
    cfg = config.load(write(), overrides)
    out = config.dump(cfg, tmp_path / "out" / "config.yaml")
    again = config.load(out)
    assert again == cfg
    assert config.to_dict(again)["loss"] == {"name": "dpo", "beta": 2500.0, "loss_type": "sigmoid"}
    assert yaml.safe_load(out.read_text())["data"]["split"] == "yes"  # quoted for YAML 1.1 readers too


def test_to_dict_is_plain_yaml_data(write, dpo):
    d = config.to_dict(config.load(write()))
    assert list(d) == [
        "model",
        "train",
        "lora",
        "data",
        "loss",
        "optim",
        "run",
        "validation",
        "ema",
        "export",
        "noise",
    ]
    assert d["optim"]["betas"] == [0.9, 0.999]
    yaml.safe_dump(d)  # only plain types


@pytest.mark.parametrize(
    ("updates", "needles"),
    [
        ({"data": {"format": "ranked"}}, ["loss.name='dpo'", "pair loss", "data.format='ranked'", "list loss"]),
        ({"optim": {"warmup_steps": 200}}, ["optim.warmup_steps=200", "run.max_steps=100"]),
        ({"run": {"save_every": 0}}, ["run.save_every=0", "> 0"]),
        ({"run": {"max_steps": 0}}, ["run.max_steps=0"]),
        ({"optim": {"batch_size": 0}}, ["optim.batch_size=0"]),
        ({"data": {"resolution": 500}}, ["data.resolution=500", "multiple of 8"]),
        ({"data": {"hflip_prob": 1.5}}, ["data.hflip_prob=1.5"]),
        ({"lora": {"dropout": 1.0}}, ["lora.dropout=1.0"]),
        ({"model": {"timestep_sampling": "logit_normal"}}, ["model.timestep_sampling='logit_normal'", "sd3"]),
        (
            {"model": {"dtype": "bf16"}, "run": {"mixed_precision": "fp16"}},
            ["model.dtype='bf16'", "run.mixed_precision"],
        ),
        ({"validation": {"every": 10}}, ["validation.every=10", "validation.prompts"]),
        ({"validation": {"prompts": ["a"], "prompts_file": "p.txt"}}, ["validation.prompts", "not both"]),
        ({"lora": {"text_encoder": True}, "data": {"latent_cache": "cache/"}}, ["lora.text_encoder", "latent_cache"]),
    ],
)
def test_cross_field_checks(write, dpo, updates, needles):
    path = write(updates)
    msg = _error(path)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lr=nan", "optim.lr=nan must be a finite number"),
        ("optim.lr=.inf", "optim.lr=inf must be a finite number"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number"),
        ("loss.beta=-5", "loss.beta (from override 'loss.beta=-5'): dpo: Config.beta must be > 0"),
        ("loss.beta=0", "dpo: Config.beta must be > 0"),
        ("run.seed=-1", "run.seed=-1 must be in [0, 2**32 - 1]"),
        ("run.output_dir=", "run.output_dir is empty"),
        ("run.output_dir=' '", "run.output_dir is empty"),
    ],
)
def test_values_that_pass_range_checks_by_accident_are_refused(write, dpo, override, needle):
    """NaN compares False with everything, a negative seed fails inside accelerate, an empty output_dir is the cwd."""
    assert needle in _error(write(), [override])


def test_mapo_snr_value_must_be_positive(write):
    assert "mapo: Config.snr_value must be > 0" in _error(
        write({"loss": {"name": "mapo", "beta": 0.1}}), ["loss.snr_value=0"]
    )


def test_validate_cli_refuses_a_nan_learning_rate(write, capsys):
    from diffalign.cli.main import main

    assert main(["validate", str(write()), "optim.lr=nan", "run.seed=-1"]) == 1
    err = capsys.readouterr().err
    assert "optim.lr=nan must be a finite number" in err and "run.seed=-1" in err


def test_cross_field_checks_accept_valid_combinations(write, dpo, fake_list_loss):
    ranked = config.load(
        write({"data": {"format": "ranked"}, "loss": {"name": fake_list_loss}}), ["optim.batch_size=4"]
    )
    assert "images per optimizer step: 4 x K" in config.summary(ranked)
    config.load(write({"model": {"family": "sd3", "timestep_sampling": "logit_normal", "dtype": "bf16"}}))
    config.load(write({"optim": {"warmup_steps": 100}, "validation": {"every": 5, "prompts_file": "p.txt"}}))


def test_list_loss_with_pair_data_fails(write, fake_list_loss):
    msg = _error(write({"loss": {"name": fake_list_loss}}))
    assert "is a list loss" in msg and "data.format='pickapic'" in msg


def test_summary_reports_derived_quantities(write, dpo):
    cfg = config.load(write(), ["optim.batch_size=2", "optim.grad_accum=4", "run.max_steps=100"])
    text = config.summary(cfg, num_processes=2)
    assert "effective batch: 16 pairs = 2 per device x 2 processes x 4 accumulation" in text
    assert "images per optimizer step: 32" in text
    assert "optimizer steps: 100" in text and "pairs seen: 1600" in text
    assert "memory: base fp32, gradient checkpointing off, text encoders loaded, optimizer adamw" in text
    flux = config.summary(config.load("flux/dpo_lora_24gb"))
    assert "flow process: uniform timesteps, shift scheduler, guidance 3.5" in flux
    assert "base nf4 (compute bf16)" in flux and "text encoders not loaded (cached embeddings)" in flux


def test_shipped_config_names_resolve(tmp_path, monkeypatch, dpo):
    (tmp_path / "configs" / "toy").mkdir(parents=True)
    (tmp_path / "configs" / "toy" / "dpo.yaml").write_text(yaml.safe_dump(BASE))
    monkeypatch.setenv("DIFFALIGN_RECIPES", str(tmp_path))
    assert config.config_names() == ["toy/dpo"]
    assert config.load("toy/dpo").loss.name == "dpo"
    with pytest.raises(ConfigError, match="did you mean 'toy/dpo'"):
        config.load("toy/dop")


def test_recipes_dir_env_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_RECIPES", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="DIFFALIGN_RECIPES"):
        config.recipes_dir()


def test_default_recipes_dir_is_inside_the_package(monkeypatch):
    """Shipped as package data (a wheel install has them); the clone's ``recipes/`` is the same folder."""
    monkeypatch.delenv("DIFFALIGN_RECIPES", raising=False)
    import diffalign

    assert config.recipes_dir() == Path(diffalign.__file__).resolve().parent / "recipes"
    assert (Path(__file__).resolve().parents[1] / "recipes").resolve() == config.recipes_dir()


def test_shipped_paths_resolve_inside_the_package_and_typos_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: diffalign:// does not depend on the current folder
    cfg = config.load("toy/dpo_world")
    assert Path(cfg.model.path) == resources.ASSETS / "toy_base" and Path(cfg.model.path).is_dir()
    with pytest.raises(ConfigError, match=r"model\.path.*diffalign://assets/toy_bas.*toy_base"):
        config.load("toy/dpo_world", ["model.path=diffalign://assets/toy_bas"])
    assert resources.resolve("stabilityai/sdxl") == "stabilityai/sdxl"  # anything else passes unchanged


def _shipped_configs() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    return sorted(root.rglob("*.yaml"))


def test_every_shipped_config_loads():
    paths = _shipped_configs()
    assert len(paths) >= 1, "no recipes/configs/**/*.yaml found"  # guards against a glob that tests nothing
    problems = []
    for path in paths:
        try:
            cfg = config.load(path)
        except ConfigError as e:
            problems.append(f"{path}: {e}")
            continue
        if hasattr(cfg, "loss"):
            config.loss_config(cfg.loss)
    assert not problems, "\n".join(problems)


def test_recipe_key_selects_schema_and_round_trips(tmp_path):
    cfg = config.load("toy/selfnpo")
    assert type(cfg) is config.RECIPE_SCHEMAS["selfnpo"]
    dumped = config.dump(cfg, tmp_path / "c.yaml")
    assert dumped.read_text().startswith("recipe: selfnpo")
    assert config.load(dumped) == cfg
    with pytest.raises(ConfigError, match="is a config for recipe 'selfnpo', not 'offline_pref'"):
        config.load("toy/selfnpo", schema=config.OfflinePrefConfig)
    with pytest.raises(ConfigError, match="cannot be overridden"):
        config.load("toy/dpo", ["recipe=selfnpo"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: selfnpoo\n" + config.dumps(config.load("toy/dpo")).split("\n", 1)[1])
    with pytest.raises(ConfigError, match="did you mean 'selfnpo'"):
        config.load(bad)


def test_validation_prompts_file_with_a_byte_order_mark(tmp_path):
    from diffalign.training.loop import validation_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffa red circle\n\nblue square\n".encode())
    cfg = config.load("toy/dpo", [f"validation.prompts_file={prompts}"])
    assert validation_prompts(cfg) == ["a red circle", "blue square"]
