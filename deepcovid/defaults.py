"""Every tunable default in one place, each with the reason for its value (python-rq's ``defaults.py``).

Settings, commands and training read their defaults from here; none restates a number.
"""

from __future__ import annotations

# --- queue and delivery -----------------------------------------------------------------------------

QUEUE = "deepcovid"
"""The Celery queue producers send chunks to and workers consume."""

BROKER_URL = "redis://127.0.0.1:6379/0"
"""The broker a single box runs: the local Redis."""

CHUNK_SIZE = 256
"""Image URIs per task message: minutes of work on a CPU worker, so a redelivery repeats little."""

MAX_ATTEMPTS = 3
"""Deliveries of an image whose chunk killed its worker before it fails as ``crashed_worker``."""

MAX_RETRIES = 20
"""Retries of a chunk on transient errors (database, S3) after which each further retry is logged as an
error; the chunk keeps waiting (at the longest backoff) rather than being dropped."""

MAX_CHUNK_URIS = 4 * CHUNK_SIZE
"""URIs one task message may carry; a larger message is rejected unread (it did not come from enqueue)."""

RETRY_BACKOFF_MAX = 300
"""Seconds: the longest wait between two retries of a chunk (the backoff doubles up to this)."""

TASK_SOFT_TIME_LIMIT = 1800
"""Seconds a chunk may run before the task is told to stop."""

TASK_TIME_LIMIT = 2100
"""Seconds after which a prefork pool process running a chunk is killed."""

STALL_MARGIN_S = 300
"""Seconds past the hard time limit before a job whose queued images stopped moving is called stalled:
room for a chunk to be redelivered and started after its worker was killed."""

VISIBILITY_TIMEOUT = 7200
"""Seconds before Redis redelivers an unacknowledged chunk: well above the hard time limit."""

MAX_CACHED_ENSEMBLES = 2
"""Ensembles a worker process keeps loaded; jobs rarely alternate between more bundles than this."""

# --- scoring --------------------------------------------------------------------------------------

CPU_BATCH_SIZE = 16
"""Images per forward pass on CPU: batch 16 beat 8 and 32 in benchmarks/ensemble_throughput.py."""

CUDA_BATCH_SIZE = 64
"""Images per forward pass on CUDA: a GPU needs larger batches to stay busy."""

DECODE_WINDOW_BATCHES = 4
"""Batches' worth of images a chunk decodes ahead of scoring (plus one per decode thread): enough to keep
inference fed, and what bounds a chunk's memory whatever its length."""

BF16_TOLERANCE = 0.01
"""Largest |bf16 - fp32| COVID probability on validation images that lets CPU workers use bf16."""

BF16_CHECK_IMAGES = 512
"""Validation images ``train`` scores in bf16 and fp32 to measure the drift (0 skips the check)."""

INT8_TOLERANCE = 0.01
"""Largest |int8 - fp32| COVID probability on validation images that lets CPU workers use int8."""

INT8_AUC_CHANGE = 0.005
"""Largest change of any network's validation ROC AUC, int8 against fp32, that lets CPU workers use int8."""

INT8_CALIBRATION_IMAGES = 300
"""Training images that calibrate the int8 activation ranges (NNCF's default subset size is 300)."""

ENSEMBLE_THRESHOLD = 0.5
"""Threshold of each network and of the ensemble where no training chose one (``bundle init``)."""

# --- input limits ---------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 64_000_000
"""Pixels an image may declare in its header before it is refused as ``too_large`` (8000 x 8000)."""

MAX_FILE_BYTES = 512 * 1024 * 1024
"""Bytes a file may have before it is refused as ``too_large`` without being read."""

S3_MAX_ATTEMPTS = 5
"""Attempts botocore makes for one S3 request before the chunk is retried later."""

S3_REGION = "us-east-1"
"""The region S3 clients sign for when none is configured (MinIO ignores it)."""

# --- database -------------------------------------------------------------------------------------

SQLITE_BUSY_TIMEOUT_S = 30.0
"""Seconds a SQLite writer waits for the lock before giving up: several processes write at once."""

REGISTER_BATCH = 5000
"""Listed images registered per transaction: fast, yet SQLite's write lock is released often."""

IN_BATCH = 1000
"""URIs per ``UPDATE ... WHERE uri IN (...)`` statement."""

STREAM_BATCH = 1000
"""Rows fetched per round trip when results are streamed out (exports of any size in constant memory)."""

RATE_WINDOW_S = 60.0
"""Seconds of recent results over which a job's rate (and so its ETA) is measured."""

# --- command output -------------------------------------------------------------------------------

TOP_FLAGGED = 5
"""Flagged images ``screen`` lists in its closing summary."""

RESULTS_TABLE_ROWS = 50
"""Rows ``results`` shows as a table unless told otherwise (exports have no limit)."""

JOBS_LISTED = 20
"""Recent jobs ``jobs`` lists unless told otherwise."""

OVERLAY_MAX_SIDE = 1024
"""Pixels: the longest side of an explanation overlay PNG; enough to see the lungs, small enough to store
one per flagged image."""

GALLERY_PER_KIND = 4
"""Images per kind (true positive, false positive, false negative) in the evaluation report's gallery of
ensemble heatmaps."""

HEATMAP_MASS_SAMPLE = 32
"""Images per class whose heatmaps the evaluation report measures for mass at the border and top corners:
bounded cost, enough to see a network that looks at labels rather than lungs."""

HEATMAP_BORDER = 0.10
"""Width of the outer border, as a fraction of the side, in the report's heatmap mass statistic."""

HEATMAP_CORNER = 0.20
"""Side of each top corner square, as a fraction of the side, where burned-in labels sit."""

# --- review workbench ----------------------------------------------------------------------------

REVIEW_HOST = "127.0.0.1"
"""Where `deepcovid serve` listens unless told: this machine only; a proxy with TLS exposes it."""

REVIEW_PORT = 8000
"""The port `deepcovid serve` listens on unless told."""

WORKLIST_PAGE = 50
"""Rows per worklist page: a screenful, and the keyset query stays a bounded top-N."""

SESSION_MAX_AGE_S = 12 * 3600
"""Seconds a workbench sign-in lasts: one working day, then the reviewer signs in again."""

LOGIN_ATTEMPTS = 5
"""Failed sign-ins allowed per user name within LOGIN_WINDOW_S."""

LOGIN_ATTEMPTS_PER_ADDRESS = 20
"""Failed sign-ins allowed per client address within LOGIN_WINDOW_S: more than per name, as a whole team
behind one proxy shares an address."""

LOGIN_WINDOW_S = 300.0
"""Seconds over which failed sign-ins are counted for the rate limit."""

HEATMAP_CACHE = 64
"""Images whose Grad-CAM maps the workbench keeps in memory: a reviewer going back and forth in a page."""

# --- training (Minaee et al. 2020 unless said) ----------------------------------------------------

EPOCHS = 100
"""Training epochs, as in the paper."""

TRAIN_BATCH_SIZE = 100
"""Training batch size, as in the paper."""

LEARNING_RATE = 1e-4
"""Adam learning rate, as in the paper."""

VAL_FRACTION = 0.2
"""Share of the labelled data (by patient) held out to choose thresholds and stop early."""

TARGET_SENSITIVITY = 0.98
"""Thresholds are the highest that reach this sensitivity on validation: the paper's operating point."""

EVAL_BATCH_SIZE = 32
"""Images per forward pass when evaluating a bundle."""

BOOTSTRAP_RESAMPLES = 1000
"""Stratified bootstrap resamples behind each AUC confidence interval."""

TABLE_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Thresholds of the paper's sensitivity/specificity table."""

PREPROCESS_VERSION = 1
"""Version of the training cache's decode + preprocessing; bump it when either changes, and every cached
image is decoded again (old versions are deleted)."""

TRAIN_CACHE_SIDE = 256
"""Pixels: training images are cached as the inference crop (shorter side, centre square) at this side,
so random crops, rotations and scales down to 224 still start from real pixels."""

MAX_DECODED_BYTES = 256 * 1024 * 1024
"""Bytes decoding one image may hold (rows x columns x samples x bytes per sample, from the header), and
the budget a process's decode threads share. A 4280 x 3520 16-bit chest radiograph holds 30 MB (60 MB in
JPEG 2000, whose codec works in 32-bit integers); 8000 x 8000 RGB at 32 bits, 768 MB, is refused. Turning
the decoded samples into 8-bit pixels adds at most as much again, so decoding holds about 512 MiB at most."""

# -- DICOMweb (a hospital PACS) --------------------------------------------------------------------------

DICOMWEB_MAX_CONNECTIONS = 4
"""Requests one worker process has in flight to one PACS at a time: a screening run must never flood a
clinical PACS, and four keep a loopback Orthanc busy."""

DICOMWEB_MAX_ATTEMPTS = 4
"""Attempts at one WADO-RS request (429, 5xx, timeouts) before the chunk is retried later."""

DICOMWEB_TIMEOUT_S = 30.0
"""Seconds a PACS may take to connect or to send the next bytes of an answer."""

DICOMWEB_BACKOFF_S = 0.5
"""Seconds before the first retry of a failed DICOMweb request; it doubles on each further one."""

DICOMWEB_BACKOFF_MAX_S = 30.0
"""Seconds: the longest a worker waits for one DICOMweb request, whatever a 429's Retry-After asks."""

QIDO_PAGE_SIZE = 500
"""Results per QIDO-RS page (limit/offset): PACSs cap pages, Orthanc at 1000 by default."""

QIDO_MODALITIES = ("CR", "DX")
"""The modalities a DICOMweb crawl asks for unless told otherwise: projection radiographs."""

# -- Eligibility -----------------------------------------------------------------------------------------

ELIGIBLE_MODALITIES = ("CR", "DX", "DR", "RG", "OT")
"""DICOM modalities scored: projection radiographs (DR is non-standard but common; OT is digitised film)."""

ELIGIBLE_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "")
"""BodyPartExamined values scored ("" lets a radiograph without the attribute through, as many CRs are)."""

INELIGIBLE_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
"""ViewPosition values not scored: the networks learned frontal (PA/AP) chest views only."""

INELIGIBLE_SERIES_WORDS = ("LAT", "LATERAL", "SCOUT", "LOCALIZER")
"""Words in SeriesDescription that mark a series as not a frontal chest radiograph."""
