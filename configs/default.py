"""Every configuration field, with its default and meaning.

The other configs start from `get_config()` here and change a few fields.
Any field can be overridden on the command line, e.g.

  python -m visionspeak_jax.main --config=configs/shapes.py \
      --workdir=/tmp/shapes --config.batch_size=64
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default configuration (the built-in shapes data, ResNet-18)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and dropout.

  # Data.
  config.dataset = "shapes_captions/default"  # TFDS name[/config].
  config.data_dir = ""  # TFDS data_dir; "" means TFDS's default.
  # Where a dataset with manual files (karpathy_captions: the JSON and the
  # images) finds them; "" means TFDS's <data_dir>/downloads/manual.
  config.manual_dir = ""
  config.train_split = "train"  # Split(s) to train on ("a+b" joins them).
  config.eval_split = "validation"  # Split for periodic evaluation.
  config.test_split = "test"  # Split for the final evaluation.
  config.image_size = 224  # Images are resized to image_size^2.
  config.max_caption_length = 20  # Words kept per caption (EOS excluded).
  # Training words seen at least vocab_min_count times are kept, rarer ones
  # become <unk>. The references keep words seen more than 5 times
  # (sgrvinod: create_input_files.py passes min_word_freq=5 to
  # utils.create_input_files, which keeps count > min_word_freq; ruotianluo:
  # scripts/prepro_labels.py keeps count > count_thr, --word_count_threshold
  # 5 by default): that is vocab_min_count = 6.
  config.vocab_min_count = 5
  # Reference captions paired with each image of a training batch, K: the
  # image is encoded once and its features read by K decoder rows, as
  # ruotianluo/self-critical.pytorch's seq_per_img (5 there). batch_size
  # counts images, so a step trains on batch_size * K captions.
  config.captions_per_image = 1
  config.shuffle_buffer_size = 10_000  # Examples in the shuffle buffer.
  # Keep decoded, resized training images in memory after the first epoch
  # (split size x image_size^2 x 3 bytes; off for COCO-sized sets).
  config.cache_train_images = False
  config.prefetch_batches = 2  # Batches prefetched to the devices.
  config.num_eval_examples = -1  # Cap on evaluated images; -1 = the split.

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.resnet_size = "18"  # "tiny", "18", "34", "50", "101", "152".
  config.model.resnet_width = 64  # Channels of the first ResNet stage.
  config.model.resnet_stem = "imagenet"  # "imagenet" (stride 4) or "small".
  # Regions the decoder attends over: 0 = the ResNet's own map (image_size /
  # 32 squared with the imagenet stem: 7x7 = 49 at 224 px); N = that map
  # average-pooled adaptively to NxN, as torch's AdaptiveAvgPool2d in both
  # PyTorch references (sgrvinod's encoder and ruotianluo's prepro_feats.py
  # use 14x14 = 196 regions).
  config.model.grid = 0
  # Allow a grid finer than the ResNet's map: pooling then repeats cells.
  # sgrvinod's tutorial does this (256 px, an 8x8 map pooled to 14x14);
  # off, such a grid is refused at start.
  config.model.grid_upsample = False
  config.model.embed_dim = 512  # Word embedding size.
  config.model.attention_dim = 512  # Additive attention size.
  config.model.hidden_dim = 512  # LSTM size.
  config.model.dropout_rate = 0.5  # Dropout on the LSTM output.
  config.model.gate = "vector"  # Context gate: "vector", "scalar", "none".
  config.model.deep_output = True  # The paper's deep output layer.
  # Learned per-region position embedding added to the features (not in the
  # paper; helps small CNNs whose features barely encode position).
  config.model.position_embedding = False
  # A torchvision-style ResNet state dict (.safetensors, or .pth/.pt with
  # torch installed) that initialises the encoder; "" = random init.
  config.model.pretrained_path = ""
  # A new run on images must start its encoder from pretrained_path (or
  # init_from's run); False lets it start from a random init.
  config.model.require_pretrained = False
  # "soft": the paper's deterministic attention (alpha-weighted context);
  # "hard": its stochastic attention, one sampled region per word in
  # training (see visionspeak_jax/training/hard_attention.py), decoded as
  # hard_attention.decoding says.
  config.model.attention = "soft"
  # Weight of the doubly stochastic attention penalty sum_r (1 - sum_t
  # alpha_tr)^2, a mean per caption, against the cross-entropy's mean per
  # word. Soft attention only: hard runs need 0, as the paper's code drops
  # its gradient there (hard_attention.py).
  config.alpha_c = 1.0
  # Hard attention's training (used with model.attention = "hard").
  config.hard_attention = ml_collections.ConfigDict()
  # Probability that an image samples its regions in a training step; the
  # others read the soft context (the paper: 0.5).
  config.hard_attention.sample_prob = 0.5
  # The REINFORCE and entropy weights are the paper's code's at its batch
  # of 16, the defaults of `capgen.train()`, which go with its stochastic
  # model (attn_type="stochastic", alpha_c=0); evaluate_coco.py's batch of
  # 64 goes with the soft model. The code weighs both terms without
  # dividing by the batch against a batch-mean cross-entropy, so each is
  # its weight x 16 here (derivation: hard_attention.py).
  # lambda_r of the REINFORCE term (rewards: a caption's mean log-likelihood
  # per word), relative to the cross-entropy: 0.1 x 16.
  config.hard_attention.reinforce_weight = 1.6
  # lambda_e of the entropy bonus per word, relative to the cross-entropy:
  # the code's alpha_entropy_c 0.002 x 16.
  config.hard_attention.entropy_weight = 0.032
  # Decay of the moving-average reward baseline (the paper: 0.9).
  config.hard_attention.baseline_decay = 0.9
  # How a hard attention model decodes: "soft" reads the expected context,
  # the alpha-weighted mix of the regions, as the authors' code decodes its
  # stochastic model (arctic-captions: generate_caps.py's main() defaults to
  # sampling=False, and capgen.py's build_sampler never passes lstm_cond_layer
  # argmax=True, so alpha itself weighs the context). "hard" reads the most
  # likely region (the code's argmax option; attention maps are one-hot).
  config.hard_attention.decoding = "soft"

  # Where the inputs come from (see visionspeak_jax/data/sources.py): "tfds"
  # reads images of `dataset` and runs the ResNet on them; "feature_cache" reads
  # features that visionspeak_jax.tools.extract_features wrote once (the model
  # then has no ResNet).
  config.data_source = "tfds"
  config.feature_cache_dir = ""  # Feature cache; "" = WORKDIR/features.
  # extract_features without pretrained_path or a checkpoint in --workdir:
  # allow a randomly initialised encoder (tests, smoke runs).
  config.extract_random_encoder = False
  # A run's workdir whose latest checkpoint initialises the encoder and/or
  # decoder present in both (e.g. a feature-cache run's decoder); its
  # vocabulary is used. "" = none. Ignored when resuming.
  config.init_from = ""

  # Computation dtype of the ResNet and the training decoder: "float32", or
  # "bfloat16" for mixed precision (bfloat16 convolution/matmul inputs and
  # ResNet activations; parameters, optimizer state, BatchNorm statistics,
  # softmax and loss in float32), as flax/examples/imagenet's half_precision.
  # "auto": bfloat16 on a CPU with AMX matrix units, float32 elsewhere
  # (visionspeak_jax/platform/dtypes.py), chosen when the run starts.
  config.dtype = "auto"

  # Training objective: "xe" (cross-entropy on the references) or "scst"
  # (self-critical: CIDEr-D rewards of sampled captions, see
  # visionspeak_jax/training/scst.py), started from an "xe" run with init_from.
  config.objective = "xe"
  config.scst = ml_collections.ConfigDict()
  config.scst.num_samples = 5  # K captions sampled per image and step.
  # "mean": each sample's baseline is the mean reward of the image's other
  # K - 1 samples; "greedy": the reward of the image's greedy caption.
  config.scst.baseline = "mean"
  # End candidates, references and document frequencies with EOS, as the
  # reference code does (ruotianluo/self-critical.pytorch: `array_to_str`
  # keeps the end token, `prepro_ngrams.py` appends it to every training
  # reference): the n-grams of a caption's ending then count, so an
  # unfinished one ("... sitting on a") earns less than a finished one.
  # The rewards always use every reference of the image, uncut.
  config.scst.cider_eos = True
  # Weight of the references' cross-entropy added to the SCST loss.
  config.scst.xe_weight = 0.0

  # Optimisation.
  config.batch_size = 64  # Global batch; divisible by the device count.
  config.eval_batch_size = 64  # Batch of each evaluating process.
  config.num_train_steps = 20_000  # Training length in steps.
  config.learning_rate = 4e-4  # Peak learning rate.
  config.warmup_steps = 500  # Linear warm-up, then cosine decay to 0.
  config.weight_decay = 0.0  # AdamW decoupled weight decay.
  config.grad_clip_norm = 5.0  # Global gradient norm clip; 0 disables.
  # Clamp each gradient element to +-grad_clip_value (sgrvinod's
  # utils.clip_gradient, 5 there); 0 disables. Applied before the norm clip.
  config.grad_clip_value = 0.0
  # Learning-rate multiplier per parameter subtree (see
  # visionspeak_jax/training/optimizer.py); 0 freezes it: no gradient, no
  # optimizer state, and a frozen encoder runs in inference mode.
  config.lr_mults = ml_collections.ConfigDict()
  config.lr_mults.encoder = 1.0  # The ResNet.
  config.lr_mults.decoder = 1.0  # The attention LSTM decoder.

  # Evaluation and decoding.
  config.max_decode_length = 22  # Generated tokens per caption (with EOS).
  config.beam_size = 3  # Beam width in evaluation; 1 decodes greedily.
  config.length_penalty = 0.0  # GNMT length penalty exponent; 0 = raw sums.
  # Matmul inputs of greedy/beam decoding (evaluation, caption CLI):
  # "float32", or "bfloat16" (products still summed in float32; faster on
  # CPUs with AVX512-BF16 or AMX and on GPUs/TPUs, see benchmarks/README.md);
  # "auto" chooses as for `dtype`.
  config.decode_dtype = "auto"
  # Decoding constraints, in greedy and beam search alike: never emit
  # <unk>; no trigram twice within a caption (ruotianluo/self-critical's
  # block_trigrams); at least min_length words before EOS (0 = no minimum).
  config.suppress_unk = False
  config.block_trigrams = False
  config.min_length = 0
  config.best_metric = "cider"  # WORKDIR/best keeps the top eval checkpoint.
  # How captions are scored (evaluation/metrics.py, docs/evaluate.md):
  # "coco" = the COCO caption protocol, pycocoevalcap's PTB tokenizer and
  # METEOR, both on Java (a run without `java` on the PATH is refused at
  # start); "regex-tokens" = no Java: the vocabulary's tokenizer, no METEOR,
  # every metric line and JSON marked protocol=regex-tokens, not comparable
  # with published numbers; "auto" = "coco" where `java` is found, else
  # "regex-tokens", decided at start and saved with the run.
  config.metrics_protocol = "auto"

  # JAX devices a CPU-only machine is split into, each with its share of
  # the batch (data parallel: the same global batch, gradients and
  # BatchNorm statistics, `step.train_step`). Small steps keep two cores
  # busier this way than one device's threads do. 0 = one per core this
  # process may use (the most that divide batch_size and eval_batch_size);
  # 1 = one device. XLA_FLAGS' --xla_force_host_platform_device_count, when
  # set, wins. No effect on GPU or TPU devices.
  config.cpu_devices = 0

  # Multi-host (see visionspeak_jax/platform/distributed.py and launch/).
  config.distributed = "auto"  # "auto" (SLURM/TPU pod detect), "yes", "no".
  config.coordinator_address = ""  # host:port of process 0, explicit clusters.
  config.num_processes = 0  # Processes in an explicit cluster.
  config.process_id = -1  # This process in an explicit cluster.

  # Bookkeeping.
  config.log_every_steps = 100  # Training log line period.
  config.eval_every_steps = 2_000  # Evaluation period (also at the end).
  config.checkpoint_every_steps = 1_000  # Checkpoint period (and the end).
  config.max_checkpoints_to_keep = 2  # Latest checkpoints kept.
  return config
