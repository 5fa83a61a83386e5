"""FEMNIST (LEAF): one agent per writer, 62 classes, DemLearn with the paper's CNN.

100 writers sampled (seeded) from LEAF's FEMNIST JSON shards in ``data_dir``
(``train/`` and ``test/`` from LEAF's ``preprocess.sh``, or ``all_data_*.json``;
see docs/data.md), each writer's own train/test samples; 50 rounds.

    python scripts/run.py --config=configs/femnist.py \\
        --config.data_dir=/path/to/leaf/data/femnist/data
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "femnist"
    c.partition = "natural"
    c.num_agents = 100  # writers sampled from the shards
    c.model = "cnn"
    c.algorithm = "demlearn"
    c.num_rounds = 50
    c.num_levels = 3
    return c
