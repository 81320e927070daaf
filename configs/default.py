"""Default FDH-MFE configuration: every field, each with a one-line meaning.

Dataset and hardware configs import this file and override a few fields. Any field can be set
from the command line: `--config.model.use_gnn=False`, `--config.bits=(32,)`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # fixes parameter init, data order and augmentation
    config.bits = (12, 24, 32, 48)  # code lengths trained jointly, one hash head each

    # ---------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    data.name = "cub"  # synthetic|cub|aircraft|nabirds|food101|dogs|cars|vegfru|folder
    data.root = ""  # dataset root on disk (unused by `synthetic`)
    data.image_size = 224  # training crop and evaluation crop size (pixels)
    data.eval_resize = 256  # evaluation: resize shorter side to this, then centre-crop
    data.crop_scale = (0.35, 1.0)  # random-resized-crop area range (fraction of the image)
    data.horizontal_flip = True  # random horizontal flip during training
    data.test_fraction = 0.5  # `folder` without split.csv: per-class fraction held out as query
    data.bad_images = "error"  # error: stop before training and list them | skip: drop them
    data.num_workers = 0  # grain worker processes (0: decode in the main process)
    data.num_threads = 8  # grain read threads per process
    data.prefetch = 2  # batches prefetched ahead of the train step
    # A frozen backbone's stage maps are computed once per image and view and stored here
    # (fdh_jax/training/feature_cache.py): "auto" = $FDH_JAX_CACHE, else ~/.cache/fdh_jax; "" = off.
    data.feature_cache = "auto"
    data.cached_views = 4  # stored views per training image: the evaluation view + 3 random crops
    # The built-in synthetic fine-grained set (used by configs/demo.py).
    data.synthetic = syn = ml_collections.ConfigDict()
    syn.num_classes = 16  # classes differ only in small part details
    syn.train_per_class = 48  # database images per class
    syn.test_per_class = 24  # query images per class
    syn.image_size = 64  # rendered image size (pixels)
    # True: every database image of a class shows that class's own background colours, queries
    # random ones (a spurious cue that only the database carries; benchmarks/spurious_background.py)
    syn.class_backgrounds = False

    # ---------------------------------------------------------------- model
    config.model = model = ml_collections.ConfigDict()
    model.backbone = "resnet50"  # resnet18|resnet34|resnet50|resnet101|mobilenet_v2|resnet_narrow
    model.width = 64  # stem width of the ResNet (64 for the standard ones)
    model.pretrained = ""  # weights: .safetensors/.tflite path or hf://ORG/MODEL; "" = random
    model.freeze_backbone = False  # train only suppression, MFE and heads
    # With a frozen MobileNetV2: its layers after this stage ("C4": blocks 14-17 and the last
    # conv) also train, at train.backbone_lr_multiplier, on the cached maps; "" = none.
    model.trainable_after = ""
    model.stages = ("C3", "C4", "C5")  # backbone stages that feed the multi-level graph
    model.use_suppression = True  # background suppression mask (ablation: False)
    model.mask_temperature = 4.0  # tau in M = sigmoid(tau * standardised activation)
    model.mask_floor = 0.25  # F <- F * (floor + (1 - floor) * M): background kept at `floor`
    model.mask_gradient = False  # let gradients flow through the mask
    model.use_gnn = True  # graph attention over the stage nodes (ablation: False)
    model.node_dim = 512  # d: channels of every graph node
    model.grid_size = 2  # g: each stage contributes g*g region nodes + 1 global node
    model.gnn_layers = 2  # L: graph-attention layers
    model.gnn_heads = 4  # attention heads per layer (node_dim must divide by it)
    model.use_classifier = True  # auxiliary classification head on the descriptor
    model.flip_average = False  # encode each image with its mirror image (evaluation, serving)
    model.pooled_to_heads = False  # hash heads see the pooled C5 beside the descriptor
    model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

    # ---------------------------------------------------------------- losses
    config.loss = loss = ml_collections.ConfigDict()
    loss.use_proxy = True  # proxy loss (ablation: False)
    loss.proxy_scale = 16.0  # s: scale of the proxy cosine logits
    loss.proxy_margin = 0.2  # m: additive cosine margin on the true class
    loss.learnable_proxies = True  # proxies are trained (else fixed at their initialisation)
    loss.uniformity_weight = 0.05  # w_uni: Wang-Isola uniformity of the proxies
    loss.uniformity_t = 2.0  # temperature of the uniformity kernel
    loss.balance_weight = 0.1  # w_bal: bit balance ||mean_batch(h)||^2 / K
    loss.use_triplet = True  # background-aware batch-hard triplet loss (ablation: False)
    loss.triplet_weight = 1.0  # w_tri
    loss.triplet_margin = 0.25  # alpha, on L2-normalised codes
    loss.quantization_weight = 0.1  # w_q: mean((|h| - 1)^2)
    loss.classification_weight = 0.5  # w_cls (used when model.use_classifier)
    loss.label_smoothing = 0.1  # classification label smoothing
    # w_nb: codes keep the neighbourhoods of the backbone's pooled C5 (0 = off; training/losses.py)
    loss.neighbourhood_weight = 0.0
    loss.neighbourhood_form = "kl"  # kl: nearest neighbours | cosine: every pair's cosine
    loss.neighbourhood_temperature = 0.1  # T of both neighbourhood distributions (kl form)
    loss.neighbourhood_pairs = "all"  # all | other_classes: neighbours among other classes only
    loss.neighbourhood_bits = ()  # the code lengths it applies to; () = all of them
    # w_inst: instance discrimination, no labels: each code finds its photo's other view among the
    # batch (InfoNCE at instance_temperature; needs train.views_per_image=2; 0 = off)
    loss.instance_weight = 0.0
    loss.instance_temperature = 0.2

    # ---------------------------------------------------------------- training
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 64  # global batch, = classes_per_batch * images_per_class
    train.classes_per_batch = 16  # P of the class-balanced P x Q sampler
    train.images_per_class = 4  # Q of the sampler
    train.views_per_image = 1  # 2: Q / 2 photos per class, each twice (two views) in the batch
    train.grad_accum_steps = 1  # A: one update per A micro-batches of batch_size / A (same lr)
    train.num_epochs = 90.0  # length in epochs of the database split (used when num_steps=0)
    train.num_steps = 0  # if > 0, overrides num_epochs
    train.optimizer = "sgd"  # sgd (with momentum) | adamw
    train.learning_rate = 0.01  # peak learning rate for a global batch of `batch_size`
    train.backbone_lr_multiplier = 1.0  # backbone lr = learning_rate * this (0.1 when pretrained)
    train.momentum = 0.9  # SGD momentum
    train.weight_decay = 5e-4  # decoupled for adamw, L2-style for sgd
    train.warmup_steps = 200  # linear warm-up, then cosine decay to 0
    train.grad_clip = 10.0  # global-norm clipping (0 disables)
    # Exponential moving average of the parameters, used for validation, evaluation and serving
    # (0 = off). The rate after t updates is min(d, (1 + t) / (10 + t)): an average over about
    # the last (10 + t) / 9 steps until t = (10d - 1) / (1 - d) (1,790 for d = 0.995), then
    # over about 1 / (1 - d) steps (`fdh_jax.training.optimizer.ema_rate`).
    train.ema_decay = 0.0
    train.log_every = 50  # steps between metric lines
    train.checkpoint_every = 500  # steps between checkpoints (the last step is always saved)
    train.keep_checkpoints = 2  # how many checkpoints to keep

    # ---------------------------------------------------------------- evaluation
    config.eval = ev = ml_collections.ConfigDict()
    ev.batch_size = 128  # encoding batch (global)
    ev.precision_at_k = (10, 100)  # report precision@k for these k
    ev.tie_break = "index"  # index: ties by database index | expected | semicon
    # Validation: a per-class fraction of the database split held out from training (and scored
    # against the rest of it) to choose a checkpoint without looking at the query split.
    ev.validation_fraction = 0.0  # 0 = no validation split (train on the whole database split)
    ev.validation_seed = 0  # fixes which database images are held out (not the run's seed)
    # images: a share of each class, scored against the training part | classes: a share of
    # the classes, never trained on, half of each one's images querying the other half.
    ev.validation_by = "images"
    ev.every = 0  # steps between validation scores (0 = at the last step only)
    ev.select = "last"  # last | best: the checkpoint scored and served (best validation mAP)
    # `--mode=eval --adapt`: codes fitted to a collection of new classes (PCA-ITQ on the
    # foreground-pooled C5 and this weight times the trained descriptor;
    # fdh_jax/search/adaptation.py, which keeps the same value for older workdirs).
    ev.adapt_descriptor_weight = 0.3
    # Fitted codes (fdh_jax/training/code_fitting.py): at the end of training, per code length a
    # PCA-ITQ of [unit(pooled C5), w * unit(h_K)] fitted on the training images (no labels)
    # replaces the heads' signs, w the smallest of `fitted_code_weights` whose validation mAP
    # (mean over the lengths) is within `fitted_code_tolerance` of the heads' codes'. Needs a
    # validation split. False: the heads' own codes.
    ev.fitted_codes = False
    ev.fitted_code_weights = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
    ev.fitted_code_tolerance = 0.5  # points of mAP x100
    return config
