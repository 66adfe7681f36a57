"""Names and default checkpoints of the paper's metrics, kept apart so command lines need not import torch."""

DEFAULT_CLIP = "openai/clip-vit-base-patch32"        # CLIP-T / CLIP-I, as the DreamBench line reports them
DEFAULT_DINO = "facebook/dino-vits16"                # DINO-I (DreamBench); DINOv2 e.g. facebook/dinov2-base
DINOV2 = "facebook/dinov2-base"
DEFAULT_AES_CLIP = "openai/clip-vit-large-patch14"   # the LAION aesthetic predictor's backbone
DEFAULT_AES_HEAD = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_AES_FILE = "aesthetic-model.pth"             # = LAION's sac+logos+ava1-l14-linearMSE.pth

IMAGE_METRICS = ("clip_t", "clip_i", "dino_i", "aes")   # besides Face-Sim, which is always computed by eval faces
LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "aes": "AES", "face_sim": "Face-Sim"}
