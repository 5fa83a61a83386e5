"""Shakespeare (LEAF): one agent per speaking role, next-character prediction.

50 roles sampled (seeded) from LEAF's Shakespeare JSON shards in ``data_dir``
(``train/`` and ``test/`` from LEAF's ``preprocess.sh``, or ``all_data_*.json``;
see docs/data.md); LEAF's model (embedding 8, two LSTM layers of 256, dense over
the 81 character classes; ``hidden`` sets the LSTM widths), FedAvg, 20 rounds,
batch 10, lr 0.8 (LEAF's). Accuracy is next-character accuracy.

    python scripts/run.py --config=configs/shakespeare.py \\
        --config.data_dir=/path/to/leaf/data/shakespeare/data
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "shakespeare"
    c.partition = "natural"
    c.standardize = "none"  # inputs are character ids
    c.num_agents = 50  # roles sampled from the shards
    c.model = "char_rnn"
    c.hidden = (256, 256)
    c.algorithm = "fedavg"
    c.lr = 0.8
    c.local_epochs = 1
    c.num_rounds = 20
    return c
