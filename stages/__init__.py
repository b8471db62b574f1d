"""Model pieces of the greedy network: psi, stages, auxiliary heads, architectures."""

from stages.arch import Architecture, StageSpec, load_architecture
from stages.blocks import AuxHead, Stage, Trunk
from stages.psi import DepthToSpace, SpaceToDepth, depth_to_space, space_to_depth

__all__ = [
    "Architecture",
    "AuxHead",
    "DepthToSpace",
    "SpaceToDepth",
    "Stage",
    "StageSpec",
    "Trunk",
    "depth_to_space",
    "load_architecture",
    "space_to_depth",
]
