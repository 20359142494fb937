"""Task and client sources: sinusoids (procedural), Omniglot, Synthetic(alpha, beta), digits.

Everything ends as device arrays with a leading client axis C (federated) or class axis
(episodic), sampled with ``jax.random`` inside the jitted round.
"""

from fmljax.data import digits, episodes, omniglot, partition, sinusoid, synthetic
from fmljax.data.digits import digits_federated, load_digits_images
from fmljax.data.episodes import (
    AUGMENTATIONS,
    canonical_augmentation,
    check_episode_config,
    client_batch_sampler,
    episode_task_sampler,
    full_client_task,
    rotate_classes,
    sample_episode,
)
from fmljax.data.omniglot import CLIENT_PARTITIONS as OMNIGLOT_CLIENT_PARTITIONS
from fmljax.data.omniglot import ENV_VAR as OMNIGLOT_ENV_VAR
from fmljax.data.omniglot import SPLITS as OMNIGLOT_SPLITS
from fmljax.data.omniglot import (
    OmniglotData,
    augment_splits,
    load_omniglot,
    load_omniglot_folders,
    load_omniglot_npz,
    load_omniglot_tfds,
    nearest_indices,
    omniglot_clients,
    resize_nearest,
    split_omniglot,
)
from fmljax.data.partition import (
    PARTITIONS,
    dirichlet_partition,
    federate,
    iid_partition,
    pad_clients,
    partition_labels,
    pathological_partition,
    sample_clients,
    split_clients,
)
from fmljax.data.sinusoid import (
    sample_sinusoid_clients,
    sample_sinusoid_task,
    sinusoid_points,
    sinusoid_task_sampler,
)
from fmljax.data.synthetic import SyntheticClients, generate_synthetic, synthetic_federated

__all__ = [
    "AUGMENTATIONS",
    "OMNIGLOT_CLIENT_PARTITIONS",
    "OMNIGLOT_ENV_VAR",
    "OMNIGLOT_SPLITS",
    "PARTITIONS",
    "OmniglotData",
    "SyntheticClients",
    "augment_splits",
    "canonical_augmentation",
    "check_episode_config",
    "client_batch_sampler",
    "digits",
    "digits_federated",
    "dirichlet_partition",
    "episode_task_sampler",
    "episodes",
    "federate",
    "full_client_task",
    "generate_synthetic",
    "iid_partition",
    "load_digits_images",
    "load_omniglot",
    "load_omniglot_folders",
    "load_omniglot_npz",
    "load_omniglot_tfds",
    "nearest_indices",
    "omniglot",
    "omniglot_clients",
    "pad_clients",
    "partition",
    "partition_labels",
    "pathological_partition",
    "resize_nearest",
    "rotate_classes",
    "sample_clients",
    "sample_episode",
    "sample_sinusoid_clients",
    "sample_sinusoid_task",
    "sinusoid",
    "sinusoid_points",
    "sinusoid_task_sampler",
    "split_clients",
    "split_omniglot",
    "synthetic",
    "synthetic_federated",
]
