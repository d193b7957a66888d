"""Message keys of the AdaDPIGU federated protocol, in one place (DESIGN.md §3).

Server -> client (train): RecordDict{ARRAYS: global model, CONFIG: ConfigRecord}
Client -> server (train): RecordDict{ARRAYS: {UPDATE, [IMPORTANCE_*]}, METRICS: MetricRecord}
Server -> client (query): RecordDict{CONFIG}; reply METRICS with the silo sizes.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# arrays in a train reply
UPDATE = "update"  # sparse: values on the active coordinates in mask order (float32)
IMPORTANCE_TOTAL = "importance-total"  # sum over released steps of g_hat^2 (or |g_hat|)
IMPORTANCE_NOISE_VAR = "importance-noise-var"  # sum over released steps of noise std^2 (public)

# round config (ConfigRecord)
SERVER_ROUND = "server-round"
PHASE = "phase"  # "importance" | "train"
TRAIN_CONFIG = "train-config"  # JSON of TrainConfig.to_dict(): the clients' single source of settings
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
LOCAL_STEPS = "local-steps"
RETENTION_RATIO = "retention-ratio"
MASK_VERSION = "mask-version"  # 0 = no mask (all coordinates active)
MASK_BITS = "mask-bits"  # packed bits, sent only when the node's copy is out of date
NUM_PARAMETERS = "num-parameters"
CLIENT_LR = "client-lr"  # the client's learning rate this round (the server's lr schedule)
RUN_KEY = "run-key"  # the run folder's name: where a client keeps its durable state (client.state)
KEEP_OPTIMIZER_STATE = "keep-optimizer-state"  # continue the client's own optimizer state

# metrics (MetricRecord)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NUM_VAL_EXAMPLES = "num-val-examples"
DP_STEPS = "dp-steps"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
IMPORTANCE_STEPS = "importance-steps"
VAL_ACCURACY = "val-accuracy"
VAL_LOSS = "val-loss"
VAL_CORRECT_NOISY = "val-correct-noisy"  # correct predictions + Gaussian noise (validation-release "noisy")
VALIDATION_RELEASE = "validation-release"
VALIDATION_NOISE = "validation-noise"
NUM_TEST_EXAMPLES = "num-test-examples"
SCHEMA_DIGEST = "schema-digest"  # query reply: sha256 of the schema the silo read its data with
MODEL_SIGNATURE = "model-signature"  # query: the server's model (names and shapes), checked by the silo
DATA_ERROR = "data-error"  # query reply: the silo's data do not match the schema (details on its own log)
# evaluate messages: what is measured (validation for model selection, or the local test split)
EVAL_PURPOSE = "eval-purpose"  # "validation" | "test"
TEST_RELEASE = "test-release"  # "noisy" | "exact"
TEST_NOISE = "test-noise"
TEST_LOSS_BOUND = "test-loss-bound"
TEST_CORRECT_NOISY = "test-correct-noisy"  # correct count + Gaussian (std test-noise)
TEST_LOSS_NOISY = "test-loss-noisy"  # sum of losses clipped to [0, bound], / bound, + Gaussian
TEST_ACCURACY = "test-accuracy"
TEST_LOSS = "test-loss"

PHASE_IMPORTANCE = "importance"
PHASE_TRAIN = "train"

# client context.state records
STATE_MASK = "adadpigu-mask"
STATE_STATS = "adadpigu-adaclip"
STATE_SPEND = "adadpigu-spend"
STATE_ROUND = "adadpigu-round"  # the last round this context.state was saved for
STATE_OPTIMIZER = "adadpigu-optimizer"  # momentum / Adam moments: post-processing of releases

# secure aggregation (dp-noise = "distributed"; client.secagg, server.secagg): a TRAIN message
# whose config has SECAGG_STAGE is one stage of the protocol; "collect" is also the round's training
SECAGG_STAGE = "secagg-stage"  # keys-setup | keys-share | collect | unmask
SECAGG_EPOCH = "secagg-epoch"  # the key set-up's number
SECAGG_INSTANCE = "secagg-instance"  # which of the set-up's independent key instances a round uses
SECAGG_INSTANCES = "secagg-instances"
SECAGG_THRESHOLD = "secagg-threshold"  # Shamir reconstruction threshold
SECAGG_NODES = "secagg-nodes"
SECAGG_PK1 = "secagg-pk1"
SECAGG_PK2 = "secagg-pk2"
SECAGG_DST = "secagg-dst"
SECAGG_SRC = "secagg-src"
SECAGG_CT = "secagg-ct"
SECAGG_ACTIVE = "secagg-active"
SECAGG_DEAD = "secagg-dead"
SECAGG_SHARE_NODES = "secagg-share-nodes"
SECAGG_SHARES = "secagg-shares"
STAGE_KEYS_SETUP = "keys-setup"
STAGE_KEYS_SHARE = "keys-share"
STAGE_COLLECT = "collect"
STAGE_UNMASK = "unmask"
# the round's lattice (common.distributed.LatticePlan): clients rebuild and check it
LATTICE_GAMMA = "lattice-gamma"
LATTICE_SHARE_STD = "lattice-share-std"
LATTICE_SURVIVORS = "lattice-survivors"
LATTICE_SILOS = "lattice-silos"
LATTICE_MAX_BATCH = "lattice-max-batch"
# the server's AdaCliP statistics for the adaptive phase under distributed noise
ADACLIP = "adaclip"  # ArrayRecord key in the RecordDict
CENTER = "center"
SCALE = "scale"
STATE_SECAGG_META = "adadpigu-secagg-meta"
