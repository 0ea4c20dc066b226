r"""PeRFlow distillation of Stable Diffusion 1.5: the authors' released recipe (PERFLOW_SPEC.md, "Released recipes").

    python -m perflow_jax.train --config configs/sd15.py --workdir DIR \
        --config.model.path=SD15_DIR --config.data.path=DATA_DIR

Values marked "recipe" are the authors' released settings; the rest are this project's defaults.
The other configs (sd21.py, sdxl.py, demo.py, tiny.py) are this one plus commented overrides.

Precision differs from the authors' SD1.5 run (--mixed_precision fp16): there the teacher, text
encoder and VAE are stored in float16, the VAE encodes the pixels every step and the latents, the
window start z_s and the teacher's DDIM solve are float16; the student keeps float32 weights under
fp16 autocast. Here the frozen networks are bfloat16 (model.teacher_dtype), the VAE's moments are
encoded once and stored as float16 (prepare_data --latent-dtype) and x0 is sampled from them every
step in float32, the solve's state is float32, and the student computes in bfloat16 over float32
master weights (model.compute_dtype). PERFLOW_SPEC.md, "Where this project departs from the release".
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()  # the teacher (and the student's initialisation)
    config.model.path = ""  # converted folder (python -m perflow_jax.convert) or diffusers folder; required
    config.model.student_init = ""  # "": start the student from the teacher; else another converted or diffusers folder
    config.model.compute_dtype = "bfloat16"  # student's activations, float32 weights (recipe: fp16 autocast)
    config.model.teacher_dtype = "bfloat16"  # frozen teacher, VAE, text encoder stored in it (recipe: float16)
    config.model.attention_backend = "auto"  # cuDNN on GPU, splash on TPU for long sequences, XLA otherwise
    config.model.remat = "none"  # recompute block activations in the backward pass: "none" | "full" | "dots"
    # A LoRA student (the authors' train_perflow_lora.py): 0 trains the whole UNet (the released recipes); r > 0
    # trains rank-r adapters on the frozen teacher instead, no EMA kept (that script's default --lora_rank: 64).
    config.model.lora_rank = 0
    config.model.lora_alpha = 8.0  # recipe (LoRA script, peft's default): the adapters add (alpha / r) B A
    config.model.lora_targets = (  # recipe (LoRA script): the UNet modules that get adapters
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    )
    config.model.lora_dropout = 0.0  # recipe (LoRA script, peft's default): no dropout; the only value supported

    config.perflow = ml_collections.ConfigDict()  # the algorithm (step.PeRFlowSettings)
    config.perflow.parameterization = "diff_eps"  # recipe: the student predicts the diff_eps noise
    config.perflow.num_windows = 4  # recipe: K, the number of time windows
    config.perflow.solver_steps = 8  # recipe: S, the teacher's DDIM steps per window
    config.perflow.teacher_guidance = 1.0  # recipe: cfg_sync, one teacher pass on the student's (dropped) text
    config.perflow.teacher_prediction_type = "epsilon"  # SD1.5's UNet predicts the noise
    config.perflow.discrete_timesteps = 1000  # recipe: M, training times t = 1 - floor(u M) / M
    config.perflow.text_dropout = 0.1  # recipe: probability of training on the empty prompt (for CFG)
    config.perflow.distance = "l2"  # recipe: mean squared error ("huber": the authors' SDXL script, unweighted only)
    config.perflow.huber_c = 1e-3  # the authors' default --huber_c: c of the huber distance sqrt(d^2 + c^2) - c
    config.perflow.weighting = "none"  # recipe: every time weighted equally
    config.perflow.zero_snr = False  # recipe: z_s at t = 1 is forward-diffused, not pure noise
    config.perflow.ema_max_decay = 0.9999  # recipe: EMA decay min(0.9999, (1 + n) / (10 + n))

    config.data = ml_collections.ConfigDict()  # prepared training data
    config.data.path = ""  # folder from python -m perflow_jax.prepare_data; required
    config.data.resolution = 512  # recipe: image size in pixels; must equal the prepared data's
    # SDXL's size ids: "fixed", (res, res, 0, 0, res, res) for every example, as the released PeRFlow-SDXL
    # was trained (recipe); "original", each image's own original size and crop (prepare_data stores them).
    config.data.sdxl_time_ids = "fixed"
    config.data.seed = 0  # shuffling seed of the data order
    config.data.worker_count = 4  # child processes decoding records (0: in the main process)
    # True trains on data whose latents another VAE (or tokenizer) encoded: by default the run is
    # refused when the data's model fingerprint (manifest.json) is not the model's.
    config.data.allow_other_vae = False

    config.optim = ml_collections.ConfigDict()  # AdamW after global-norm clipping
    config.optim.lr = 8e-5  # recipe: peak learning rate
    config.optim.b1 = 0.9  # recipe: AdamW beta1
    config.optim.b2 = 0.999  # recipe: AdamW beta2
    config.optim.eps = 1e-8  # recipe: AdamW epsilon
    config.optim.weight_decay = 1e-2  # recipe: AdamW decoupled weight decay
    config.optim.grad_clip = 1.0  # recipe: clip gradients to this global norm
    config.optim.schedule = "constant"  # recipe: constant learning rate ("constant" | "cosine")
    config.optim.warmup_steps = 0  # recipe: no warm-up (linear from 0 to lr over this many steps)

    config.train = ml_collections.ConfigDict()  # the run
    config.train.global_batch_size = 1024  # recipe: examples per step over all devices (32 per GPU)
    config.train.gradient_accumulation_steps = 1  # recipe: 32 per GPU at once; raise it where memory runs out
    config.train.num_steps = 10_000  # optimizer steps; the reference converged in about 4k at batch 1024
    config.train.seed = 0  # seed of the noise, times and text dropout

    config.mesh = ml_collections.ConfigDict()  # device mesh ('data', 'fsdp')
    config.mesh.shape = (-1, 1)  # data parallel over all devices; (1, -1) shards the state (16 GB chips)

    config.checkpoint = ml_collections.ConfigDict()  # Orbax checkpoints in WORKDIR/checkpoints
    config.checkpoint.every_steps = 1000  # save every this many steps (and at the end)
    config.checkpoint.keep = 3  # keep the last this many checkpoints

    config.log = ml_collections.ConfigDict()  # console, TensorBoard, metrics.jsonl and sample grids
    config.log.every_steps = 50  # a console line and scalars every this many steps
    config.log.eval_every_steps = 1000  # a sample grid of the EMA weights every this many steps
    config.log.sample_prompts = (  # the grid's prompts, one image each
        "a photo of a cat sitting on a wooden table",
        "a portrait photo of an old man with a beard, studio light",
        "a red sports car on a mountain road at sunset",
        "a bowl of fruit on a kitchen counter, morning light",
        "a snowy mountain landscape with a lake and pine trees",
        "a lighthouse on a rocky coast during a storm",
        "an oil painting of a city street in the rain",
        "a corgi running on a beach, high quality photo",
    )
    config.log.sample_steps = 4  # released inference setting: 4 sampler steps
    config.log.sample_guidance = 4.5  # released inference setting: CFG scale 4.5 at 4 steps
    config.log.sample_seed = 0  # seed of the grid's initial noise (the same every eval)

    config.eval = ml_collections.ConfigDict()  # train-time FID of the EMA student (afterwards: perflow_jax.evaluate)
    config.eval.fid_every = 0  # an FID every this many steps and at the last step; 0: off
    config.eval.num_images = 2000  # images drawn per FID, from log.sample_seed's noise (the same every time)
    config.eval.reference = ""  # statistics .npz from python -m perflow_jax.evaluate (its DIR/references/NAME.npz)
    config.eval.features = "inception"  # feature network: "inception" (pytorch-fid's) or "digits" (the demo's)
    config.eval.inception = ""  # pt_inception-2015-12-05-6726825d.pth, for features "inception"
    config.eval.batch_size = 16  # images per jitted call
    config.eval.prompts = ""  # a prompts file (one a line, or COCO captions .json); "": log.sample_prompts in turn
    config.eval.steps = 0  # sampler steps; 0: log.sample_steps (guidance: log.sample_guidance)

    # JAX's persistent compilation cache (perflow_jax/compile_cache.py): a resumed run loads its step from it.
    # "": WORKDIR/jax_cache; "none": no cache of the run's own (JAX_COMPILATION_CACHE_DIR applies); else a folder
    config.compilation_cache_dir = ""
    config.tpu_pod = False  # call jax.distributed.initialize() for a multi-host TPU slice
    return config
