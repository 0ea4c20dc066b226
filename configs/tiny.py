r"""A tiny PeRFlow run on the CPU: the tests' and the demo's config (tiny random models, 32 px data).

The SD1.5 recipe's algorithm at toy sizes; the paths are left empty for the caller to fill:

    python -m perflow_jax.train --config configs/tiny.py --workdir /tmp/tiny \
        --config.model.path=TINY_MODEL_DIR --config.data.path=TINY_DATA_DIR
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()  # the teacher (and the student's initialisation)
    config.model.path = ""  # converted folder (python -m perflow_jax.convert) or diffusers folder; required
    config.model.student_init = ""  # "": start the student from the teacher; else another converted or diffusers folder
    config.model.compute_dtype = "float32"  # float32 everywhere, so CPU results compare tightly
    config.model.teacher_dtype = "float32"  # frozen teacher, VAE and text encoders kept in float32 too
    config.model.attention_backend = "auto"  # XLA on the CPU
    config.model.remat = "none"  # no rematerialisation: tiny activations

    config.perflow = ml_collections.ConfigDict()  # the algorithm (step.PeRFlowSettings)
    config.perflow.parameterization = "diff_eps"  # as the SD1.5 recipe: the student predicts the diff_eps noise
    config.perflow.num_windows = 4  # K, the number of time windows (as the recipes)
    config.perflow.solver_steps = 2  # S, the teacher's DDIM steps per window (few, to be quick)
    config.perflow.teacher_guidance = 1.0  # cfg_sync, one teacher pass on the student's (dropped) text
    config.perflow.teacher_prediction_type = "epsilon"  # the tiny test UNets predict the noise
    config.perflow.discrete_timesteps = 1000  # M, training times t = 1 - floor(u M) / M
    config.perflow.text_dropout = 0.1  # probability of training on the empty prompt (for CFG)
    config.perflow.distance = "l2"  # mean squared error
    config.perflow.weighting = "none"  # every time weighted equally
    config.perflow.zero_snr = False  # z_s at t = 1 is forward-diffused, not pure noise
    config.perflow.ema_max_decay = 0.9999  # EMA decay min(0.9999, (1 + n) / (10 + n))

    config.data = ml_collections.ConfigDict()  # prepared training data
    config.data.path = ""  # folder from python -m perflow_jax.prepare_data; required
    config.data.resolution = 32  # image size in pixels (the tiny VAE makes 8 x 8 latents); must equal the data's
    config.data.seed = 0  # shuffling seed of the data order
    config.data.worker_count = 0  # decode records in the main process

    config.optim = ml_collections.ConfigDict()  # AdamW after global-norm clipping
    config.optim.lr = 1e-4  # peak learning rate
    config.optim.b1 = 0.9  # AdamW beta1
    config.optim.b2 = 0.999  # AdamW beta2
    config.optim.eps = 1e-8  # AdamW epsilon
    config.optim.weight_decay = 1e-2  # AdamW decoupled weight decay
    config.optim.grad_clip = 1.0  # clip gradients to this global norm
    config.optim.schedule = "constant"  # constant learning rate ("constant" | "cosine")
    config.optim.warmup_steps = 0  # no warm-up (linear from 0 to lr over this many steps)

    config.train = ml_collections.ConfigDict()  # the run
    config.train.global_batch_size = 8  # examples per step over all devices
    config.train.gradient_accumulation_steps = 1  # gradients of the whole batch at once
    config.train.num_steps = 6  # optimizer steps
    config.train.seed = 0  # seed of the noise, times and text dropout

    config.mesh = ml_collections.ConfigDict()  # device mesh ('data', 'fsdp')
    config.mesh.shape = (-1, 1)  # data parallel over all devices

    config.checkpoint = ml_collections.ConfigDict()  # Orbax checkpoints in WORKDIR/checkpoints
    config.checkpoint.every_steps = 3  # save every this many steps (and at the end)
    config.checkpoint.keep = 2  # keep the last this many checkpoints

    config.log = ml_collections.ConfigDict()  # console, TensorBoard, metrics.jsonl and sample grids
    config.log.every_steps = 1  # a console line and scalars every step
    config.log.eval_every_steps = 3  # a sample grid of the EMA weights every this many steps
    config.log.sample_prompts = ("a photo of a cat", "a red car")  # the grid's prompts, one image each
    config.log.sample_steps = 4  # sampler steps (one per window)
    config.log.sample_guidance = 4.5  # CFG scale of the grid (the SD1.5 4-step setting)
    config.log.sample_seed = 0  # seed of the grid's initial noise (the same every eval)

    config.tpu_pod = False  # call jax.distributed.initialize() for a multi-host TPU slice
    return config
