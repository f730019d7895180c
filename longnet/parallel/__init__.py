"""Data x sequence parallelism: the mesh, :func:`parallelize`, and the per-rank
segment geometry (:mod:`longnet.parallel.layout`)."""

from longnet.parallel.mesh import (
    MESH_DIMS,
    build_mesh,
    current_phase,
    flat_mesh,
    local_batch,
    mean_over_mesh,
    mesh_shape,
    parallelize,
    phase,
    track_collectives,
)

__all__ = [
    "MESH_DIMS",
    "build_mesh",
    "mesh_shape",
    "parallelize",
    "local_batch",
    "mean_over_mesh",
    "flat_mesh",
    "current_phase",
    "phase",
    "track_collectives",
]
