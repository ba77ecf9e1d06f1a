"""Typed, strict recipe configs: YAML file -> dotted ``a.b=c`` overrides -> frozen dataclasses.

``engine`` is the machinery (YAML 1.2 reading, overrides, typed binding with "did you mean", load/dump, the
recipe and validator registries, where shipped recipes and configs are). The schemas are beside it:
``common`` (sections every recipe shares and their checks) and one module per recipe (``offline_pref``,
``selfnpo``, ``stepwise_pref``, ``reward_grad``, ``online_rl``, ``dro``), each registering its schema and cross-field
checks with the engine. A new recipe adds one module here and one import below. Everything is re-exported, so
``from diffalign import config; config.load(...)`` is the API.
"""

from diffalign.config.common import (
    EDITING_FAMILIES,
    FLOW_FAMILIES,
    GUIDANCE_EMBEDDED,
    VIDEO_FAMILIES,
    CurriculumConfig,
    DataConfig,
    EmaConfig,
    ExportConfig,
    LoraConfig,
    LossSection,
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    TrainConfig,
    ValidationConfig,
    effective_lr,
    terms_kind,
    training_lines,
)
from diffalign.config.dro import DROConfig, DROSection
from diffalign.config.engine import (
    DEFAULT_RECIPE,
    RECIPE_SCHEMAS,
    ConfigError,
    PluginSection,
    apply_overrides,
    build,
    config_names,
    configs_dir,
    dump,
    dumps,
    launch_problems,
    load,
    loss_config,
    parse_override,
    problems_message,
    raise_problems,
    recipe_name,
    recipe_names,
    recipe_of,
    recipes_dir,
    register_launch_check,
    register_recipe,
    register_validator,
    resolve_config_path,
    schema_for_recipe,
    to_dict,
    validate,
)
from diffalign.config.offline_pref import NoiseConfig, OfflinePrefConfig, summary
from diffalign.config.online_rl import OnlineRLConfig, OnlineSection, RewardConfig
from diffalign.config.reward_grad import RewardGradConfig, RewardGradSection
from diffalign.config.selfnpo import SelfNPOConfig, SelfNPOSection
from diffalign.config.stepwise_pref import StepScorerConfig, StepwisePrefConfig, StepwiseSection


def describe(cfg: object, num_processes: int = 1) -> str:
    """The ``--dry-run`` summary of a recipe config: offline_pref's ``summary``, or the lines every training recipe
    shares (``training_lines``: global batch, learning rate, what trains, EMA, export); "" for other recipes."""
    if isinstance(cfg, OfflinePrefConfig):
        return summary(cfg, num_processes)
    if hasattr(cfg, "optim") and hasattr(cfg, "train"):
        return "\n".join(training_lines(cfg, num_processes))
    return ""
