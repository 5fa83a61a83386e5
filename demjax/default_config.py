"""Default: DemLearn on scikit-learn's digits (embedded, offline), 50 agents.

Run: ``python scripts/run.py`` (or ``--config=configs/default.py``); override any
field with ``--config.FIELD=VALUE``, e.g. ``--config.num_agents=200``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Independent replicas of the run in one program (a leading replica axis):
    # replica r draws everything from seed + r; replicate_split: its data split
    # too (else every replica shares the split of seed). docs/running.md.
    c.num_replicas = 1
    c.replicate_split = False

    # Data (demjax.data).
    # dataset: digits | fashion_mnist | fashion_mnist_tfds | mnist | emnist |
    # cifar10 | cifar100 | femnist | shakespeare (LEAF JSON shards or TFF HDF5
    # files in data_dir; docs/data.md)
    c.dataset = "digits"
    # data_dir "": the default (fashion_mnist: /usr/share/datasets/fashion-mnist)
    c.data_dir = ""
    # pathological | dirichlet | iid | natural (one agent per writer / role /
    # client of femnist, shakespeare, cifar100 from TFF's HDF5; num_agents of them
    # sampled) | file (partition_file) | arrays (a ready partition passed to
    # demjax.train.run; see docs/data.md)
    c.partition = "pathological"
    c.partition_file = ""  # partition='file': a .json / .npz split file
    c.labels_per_agent = 2
    c.dirichlet_alpha = 0.5
    c.samples_per_agent = 0  # 0 = no cap on samples per agent
    # > 0: hold out this share of every agent's training rows and evaluate on
    # them instead of the test split (hyper-parameter tuning; benchmarks/tune.py)
    c.val_fraction = 0.0
    # global (reference: (x - mean) / (std + 0.001) over the pool) | per_pixel |
    # given (standardize_mean, standardize_std) | none (pixels in [0, 1])
    c.standardize = "global"
    c.standardize_mean = 0.0
    c.standardize_std = 1.0
    # tfds sources only: let tensorflow-datasets fetch missing data (needs internet;
    # offline it retries for minutes before the clear error).
    c.download = True
    c.num_agents = 50

    # Model and local training (demjax.models, demjax.local).
    c.model = "mlp"  # mlr | mlp | cnn | cnn4 | cnn_cifar
    c.hidden = (100,)
    # Layer initialisation: flax (LeCun normal kernels, zero biases) | torch
    # (PyTorch's nn.Linear/nn.Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    # kernels and biases).
    c.init = "flax"
    # CNN convolutions in local training: auto (measured, see local_plan) |
    # patches (im2col GEMMs) | xla (lax.conv); parameters are interchangeable.
    c.conv_impl = "auto"
    # Dense weight gradients: auto (measured, see local_plan) | xla | wgrad_t
    # (explicit transpose; see docs/performance.md). Same results either way.
    c.matmul_impl = "auto"
    c.optimizer = "sgd"  # sgd | momentum | adam
    c.lr = 0.05
    c.local_epochs = 2
    c.batch_size = 10
    # Agents grouped into at most this many buckets of similar local step counts,
    # each a vmap with its own step count (1 = one vmap; same results either way).
    c.local_buckets = 4
    # Execution plan of local training (same results, different speed; see
    # demjax/plan.py): auto (time the candidates on real local steps before
    # round 0, cache the choice) | all (one vmap) | sequential (one agent after
    # another in one jitted loop) | block:K (vmapped blocks of K agents).
    # Capped by a free-memory estimate.
    c.local_plan = "auto"
    # How the phases run over replicas (num_replicas > 1): auto (a plan of all
    # agents at once: vmap; blocks / sequential: both timed, the faster cached)
    # | vmap (one batch of R x A agents) | one_at_a_time (a loop over replicas,
    # each running its population's plan). Same results either way.
    c.replica_plan = "auto"

    # Algorithm (demjax.algorithms).
    c.algorithm = "demlearn"  # demlearn | demlearn_p | fedavg | fedprox | local
    c.num_rounds = 30
    # Proximal coefficient; None = the algorithm's default (demlearn_p 0.002,
    # fedprox 0.5, others 0).
    c.mu = ml_collections.config_dict.placeholder(float)
    c.alpha = 0.7  # top-down mixing weight of the parent model
    # Server averaging (FedAvg-style steps and group models): mean | median |
    # trimmed_mean | noisy_median (demjax.robust).
    c.aggregator = "mean"
    c.trim_fraction = 0.1  # trimmed_mean: fraction cut from each end, [0, 0.5)
    c.aggregator_noise = 0.0  # noisy_median: std of the noise added before the median

    # Self-organizing group tree (demjax.cluster). num_levels counts group levels
    # below the root (the paper's K = num_levels + 1).
    c.num_levels = 3
    c.tau = 1  # regroup every tau rounds; 0 = build the tree once (round 0) and keep it
    c.tree_mode = "binary"  # binary (reference, top-down splits) | maxclust
    # maxclust mode: groups per level, level 1 first, e.g. (16, 4, 2)
    c.level_groups = ()
    c.distance = "euclidean"  # euclidean | cosine
    c.linkage = "average"  # average | single | complete | weighted | ward
    c.linkage_backend = "scipy"  # scipy | fastcluster
    c.cluster_features = "weights"  # weights | updates
    # Random projection of the clustering features to this many dimensions before
    # the distance matrix (0 = exact distances on all parameters).
    c.sketch_dim = 0
    c.linkage_sample = 0  # linkage on this many sampled agents; 0 = all
    # Gram matrix of the distances accumulated over column blocks of this width
    # (bounded memory for large models); 0 = one matmul.
    c.distance_block = 0
    c.weighting = "agents"  # agents (reference) | samples
    # The reference code's undocumented amplify step (x1.15 per group average for
    # rounds t < 5); off by default, only to reproduce the reference numbers.
    c.amplify = False
    c.amplify_factor = 1.15
    c.amplify_rounds = 5

    # Peer-to-peer communication graph of the decentralized plug-ins (sgp, pdbo;
    # demjax.network): base graph complete | erdos_renyi | file, mode static |
    # undirected | directed (each edge active per step with its own rate
    # r ~ U(low, high) from network_rates), dense or sparse (edge-list) mixing.
    c.network = "complete"
    c.network_mode = "static"
    c.network_rates = "0.4,0.8"
    c.network_edge_prob = 0.3
    c.network_file = ""
    c.network_impl = "dense"

    # Devices the agent axis is sharded over (mesh axis "agents"): 0 = auto (all
    # devices that divide num_agents evenly; with several CPU devices of one
    # process, one device or all of them, whichever trains faster as measured
    # by the plan search), 1 = one device, D = exactly D devices.
    c.num_devices = 0

    # Participation and faults (vectorized masks; see docs/faults.md):
    # fraction of agents sampled per round, independent
    # per-round dropout probability, fraction of agents per round that complete
    # only a uniformly random part of their local steps.
    c.participation = 1.0
    c.dropout = 0.0
    c.stragglers = 0.0

    # Byzantine agents (demjax.attacks; docs/faults.md): none | sign_flip |
    # gaussian | scaling | alie | ipm (their messages corrupted at the server
    # aggregation) | label_flip (their training labels flipped at data time).
    c.attack = "none"
    c.attack_fraction = 0.0  # floor(fraction * num_agents) Byzantine agents, [0, 1)
    c.attack_redraw = False  # re-draw the set every round (else fixed for the run)
    # sign_flip / scaling multiplier; None = 1 (sign_flip), num_agents (scaling).
    c.attack_scale = ml_collections.config_dict.placeholder(float)
    c.attack_noise_std = 1.0  # gaussian: std of the noise replacing the update
    c.attack_epsilon = 0.1  # ipm: the Byzantine agents send -epsilon * honest mean
    c.attack_alie_z = ml_collections.config_dict.placeholder(float)  # None: alie_z

    # Checkpoints (orbax, in <workdir>/checkpoints) every k rounds and at the end;
    # 0 = off. A rerun on the same workdir resumes from the last one.
    c.checkpoint_every = 10
    # Checkpoints kept (the newest); on resume a damaged newest checkpoint falls
    # back to the next older one, so keep at least 2 to survive one bad write.
    c.keep_checkpoints = 2
    # Group-tree snapshots with their linkage (<workdir>/trees/round_*.json, for
    # scripts/plot.py) every k regrouping rounds and the last; 0 = only tree_final.
    c.tree_snapshot_every = 10

    # Evaluation.
    c.eval_samples = (
        0  # C-GEN on a seeded subsample of this size; 0 = all pooled test data
    )
    c.eval_batch = 0  # models evaluated at once; 0 = auto (1 for CNNs, else 8)
    c.eval_every = 1  # evaluate every k rounds (and always the last round)
    c.progress = True  # tqdm bar (round, ETA, latest C-SPE/C-GEN); --quiet turns it off
    c.tensorboard = False  # also write TensorBoard events to <workdir>/tensorboard

    # Hyper-parameters of the plug-in algorithms, one group per algorithm with the
    # paper's defaults, e.g. --config.ditto.lam=0.1 (see docs/algorithms.md).
    add_plugin_hparams(c)
    return c


def add_plugin_hparams(c: ml_collections.ConfigDict) -> None:
    """Adds ``c.<algorithm>.<field>`` for every algorithm with hyper-parameters."""
    from demjax.algorithms import REGISTRY

    for name, plugin in REGISTRY.items():
        if plugin.hparams:
            c[name] = ml_collections.ConfigDict(
                {k: h.default for k, h in plugin.hparams.items()}
            )
