"""The registered plug-ins, in the order their stage hooks run."""
from __future__ import annotations

from facepipe.config import StageConfig
from facepipe.train.plugins.arconvl import ARConvL
from facepipe.train.plugins.base import PluginContext, TrainerPlugin
from facepipe.train.plugins.clmle import CLMLE
from facepipe.train.plugins.drw import DeferredReweighting
from facepipe.train.plugins.margin_heads import MarginHeads
from facepipe.train.plugins.umm import SampleUncertainty, UncertaintyMargins

# Order matters where two plug-ins act on one stage: a clmle stage's clusters are built before
# a UMM refresh measures uncertainty (both draw on the random streams).
PLUGINS: tuple[type[TrainerPlugin], ...] = (
    MarginHeads, ARConvL, CLMLE, DeferredReweighting, UncertaintyMargins, SampleUncertainty,
)


def plugins_for(stage: StageConfig) -> list[type[TrainerPlugin]]:
    """The plug-ins that shape ``stage``, in hook order."""
    return [plugin for plugin in PLUGINS if plugin.applies_to(stage)]


def build_plugins(ctx: PluginContext) -> dict[str, TrainerPlugin]:
    """One instance of every registered plug-in for a run, by name: their run-level state (an
    annealing count, a cluster stage) and checkpoint entries outlive the stages they shape."""
    return {plugin.name: plugin(ctx) for plugin in PLUGINS}


def plugin_run_files() -> tuple[str, ...]:
    """Files the plug-ins write into a run folder."""
    return tuple(name for plugin in PLUGINS for name in plugin.run_files)
