"""Sample quality: FID and KID through torch-fidelity, with Inception weights found offline, the papers'
protocols (protocol.py) and `diffrun-eval` for checkpoints (cli.py)."""
from diffrun.evaluation.fid import (SampledImages, compute_fid_against_statistics, compute_fid_kid,
                                    compute_fid_kid_from_sampler, frechet_distance)
from diffrun.evaluation.inception import (HeadlessInceptionError, InceptionWeights, InceptionWeightsUnavailable,
                                          resolve_inception_weights)
from diffrun.evaluation.reference import ReferenceStatistics, read_reference_statistics

__all__ = ["HeadlessInceptionError", "InceptionWeights", "InceptionWeightsUnavailable", "ReferenceStatistics",
           "SampledImages", "compute_fid_against_statistics", "compute_fid_kid", "compute_fid_kid_from_sampler",
           "frechet_distance", "read_reference_statistics", "resolve_inception_weights"]
