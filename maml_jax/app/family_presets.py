"""Each learner's own Omniglot protocol, from its paper or its authors' code.

Every value names its source in a comment; ``SOURCES`` holds one line per preset
for tables, and ``NOT_HONOURED`` what the authors did that these runs do not (or
cannot) do. Fields left out take ``FewShotConfig``'s defaults (the MAML paper's
protocol: Omniglot with 64 filters, Vinyals split with rotations, Adam 1e-3,
stride-2 Conv4 with a mean-over-space head, transductive batch norm).

Sources (repositories read at their last public commit):

* Finn et al. 2017, "Model-Agnostic Meta-Learning", ``cbfinn/maml`` ``main.py``.
* Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
  ``openai/supervised-reptile`` (README's commands, ``args.py``, ``models.py``,
  ``reptile.py``).
* Snell, Swersky & Zemel 2017, "Prototypical Networks",
  ``jakesnell/prototypical-networks`` (``scripts/train/few_shot/run_train.py``,
  ``train.py``).
* Li et al. 2017, "Meta-SGD" (no authors' code).
* Antoniou, Edwards & Storkey 2019, "How to train your MAML",
  ``AntreasAntoniou/HowToTrainYourMAMLPytorch``
  (``experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json``,
  ``few_shot_learning_system.py``).
* Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients",
  ``aravindr93/imaml_dev`` (``examples/README.md``,
  ``examples/omniglot_implicit_maml.py``, ``implicit_maml/learner_model.py``).
* Raghu et al. 2020, "Rapid Learning or Feature Reuse?" (ANIL).
"""

from __future__ import annotations

from typing import Any

_REPTILE = "openai/supervised-reptile README, 'transductive 1-shot 5-way Omniglot'"
_PROTONET = "jakesnell/prototypical-networks run_train.py defaults"
_MAMLPP = (
    "HowToTrainYourMAMLPytorch experiment_config/"
    "omniglot_maml++-omniglot_1_8_0.1_64_5_0.json"
)
_IMAML = "aravindr93/imaml_dev examples/README.md (5-way 1-shot command)"

PRESETS: dict[str, dict[str, Any]] = {
    # First-order MAML: the MAML paper's Omniglot 5-way 1-shot protocol with the
    # inner gradients stopped (Finn et al. 2017, Sec. 5.2; cbfinn/maml
    # --stop_grad=True); every other value as omniglot-5w1s (cbfinn/maml main.py).
    "fomaml-omniglot-5w1s": dict(
        algorithm="fomaml",
        dataset="omniglot",
        ways=5,
        shots=1,
        queries=1,
        meta_batch=32,  # main.py: --meta_batch_size=32
        inner_steps=1,  # --num_updates=1
        inner_lr=0.4,  # --update_lr=0.4
        test_inner_steps=3,  # Finn et al. 2017, App. A.1: 3 steps at test
        steps=60_000,  # --metatrain_iterations=60000
    ),
    "reptile-omniglot-5w1s": dict(
        algorithm="reptile",
        dataset="omniglot",
        ways=5,  # args.py --classes default 5
        shots=1,  # --shots 1
        queries=1,  # reptile.py evaluate: num_shots + 1 per class, 1 to test
        train_shots=10,  # --train-shots 10
        train_queries=1,  # none in Reptile's training; 1 for the logged loss
        meta_batch=5,  # --meta-batch 5
        inner_steps=5,  # --inner-iters 5
        inner_optimizer="adam",  # models.py: DEFAULT_OPTIMIZER = Adam
        inner_b1=0.0,  # models.py: AdamOptimizer(beta1=0)
        inner_lr=0.001,  # --learning-rate 0.001
        test_inner_steps=50,  # --eval-iters 50 (eval batch 5 = the 1-shot support)
        outer_optimizer="sgd",  # reptile.py: θ ← θ + ε (mean φ − θ)
        outer_lr=1.0,  # --meta-step 1
        outer_schedule="linear",  # train.py: ε annealed linearly over the run
        outer_lr_final=0.0,  # --meta-step-final 0
        steps=100_000,  # --meta-iters 100000
        norm="transductive",  # --transductive (batch norm on the test batch)
        loss_scale=1.0,  # Adam's step does not depend on the loss scale (up to ε)
        head="flatten",  # models.py: dense layer on the flattened 2×2×64 features
    ),
    "protonet-omniglot-5w1s": dict(
        algorithm="protonet",
        dataset="omniglot",
        ways=5,  # --data.test_way 5
        shots=1,  # Snell et al. 2017, Sec. 3.1: training shot matches test shot
        queries=15,  # --data.test_query 15
        train_ways=60,  # --data.way 60 (Snell et al. 2017, Sec. 3.1)
        train_queries=5,  # --data.query 5
        meta_batch=1,  # one episode per Adam step (train.py)
        inner_steps=1,  # unused: no inner loop
        inner_lr=0.1,  # unused: no inner loop
        test_inner_steps=1,  # prototypes from the support set, no steps
        outer_lr=0.001,  # --train.learning_rate 0.001, Adam (--train.optim_method)
        outer_schedule="halving",  # train.py: StepLR(gamma=0.5)
        # --train.decay_every 20 epochs × --data.train_episodes 100 (Snell et al.
        # 2017, Sec. 3.1: halved every 2000 episodes)
        outer_decay_every=2000,
        # The authors stop on validation loss (--train.patience 200 epochs); after
        # 20,000 episodes the rate is 1e-3 / 2^10, so later episodes change little.
        steps=20_000,
        norm="running",  # nn.BatchNorm2d, model.eval() at test (running averages)
        downsample="maxpool",  # protonet_conv: conv-BN-ReLU-maxpool blocks
        head="flatten",  # 1×1×64 after four pools: the 64-d embedding
    ),
    # Meta-SGD has no authors' code; the paper follows MAML's Omniglot protocol.
    "meta-sgd-omniglot-5w1s": dict(
        algorithm="meta_sgd",
        dataset="omniglot",
        ways=5,
        shots=1,
        queries=1,
        meta_batch=32,  # MAML's (cbfinn/maml main.py)
        inner_steps=1,  # Li et al. 2017: one-step adaptation
        test_inner_steps=1,  # Li et al. 2017: one step at test as well
        # Li et al. 2017 initialise each α at random in [0.005, 0.1]; here every
        # α starts at that range's mean (no random initialisation of the rates).
        inner_lr=0.0525,
        loss_scale=1.0,  # mean cross-entropy, the scale α's range refers to
        steps=60_000,  # MAML's (cbfinn/maml main.py); not confirmed for Meta-SGD
    ),
    "maml-plus-plus-omniglot-5w1s": dict(
        algorithm="maml_plus_plus",
        dataset="omniglot",
        ways=5,  # num_classes_per_set 5
        shots=1,  # num_samples_per_class 1
        queries=1,  # num_target_samples 1
        meta_batch=8,  # batch_size 8
        inner_steps=5,  # number_of_training_steps_per_iter 5
        inner_lr=0.1,  # init_inner_loop_learning_rate 0.1 (LSLR learns it)
        test_inner_steps=5,  # number_of_evaluation_steps_per_iter 5
        loss_scale=1.0,  # few_shot_learning_system.py: F.cross_entropy (mean)
        outer_lr=0.001,  # meta_learning_rate 0.001 (Adam, amsgrad=False)
        outer_schedule="cosine",  # CosineAnnealingLR(T_max=total_epochs)
        outer_lr_final=0.00001,  # min_learning_rate 0.00001
        steps=50_000,  # total_epochs 100 × total_iter_per_epoch 500
        msl_anneal_steps=5_000,  # multi_step_loss_num_epochs 10 × 500
        # per_step_bn_statistics true, learnable_bn_gamma/beta true: one set of
        # statistics and norm weights per step (BNRS + BNWB).
        norm="per-step",
        downsample="maxpool",  # max_pooling true
        head="flatten",  # 1×1×64 after four pools
        # second_order true, first_order_to_second_order_epoch -1: second order
        # from the first step, so no derivative-order annealing in this protocol.
    ),
    "imaml-omniglot-5w1s": dict(
        algorithm="imaml",
        dataset="omniglot",
        ways=5,  # --N_way 5
        shots=1,  # --K_shot 1
        queries=1,  # dataset.py: K query examples per class
        meta_batch=32,  # --task_mb_size 32
        inner_steps=16,  # --n_steps 16
        inner_lr=0.1,  # --inner_lr 1e-1 (SGD)
        test_inner_steps=16,  # measure_accuracy.py --n_steps 16
        reg_lambda=2.0,  # --lam 2.0
        cg_steps=5,  # --cg_steps 5
        cg_damping=1.0,  # --cg_damping 1.0 (their operator differs: see below)
        outer_lr=0.001,  # --outer_lr 1e-3 (Adam)
        steps=20_000,  # README: "meta_steps (at least) 20000"
        loss_scale=1.0,  # torch.nn.CrossEntropyLoss (mean)
        head="flatten",  # make_conv_network: Linear(2*2*64, N)
        # iMAML's Hessian-vector products are forward-over-reverse, and the CPU
        # default (im2col) convolution has a custom VJP, which forward mode
        # cannot differentiate; lax's convolution is the default elsewhere anyway.
        conv_impl="lax",
    ),
    # ANIL's Omniglot results are 20-way; the MAML paper's 20-way protocol with
    # only the head adapted (Raghu et al. 2020 use MAML's hyperparameters).
    "anil-omniglot-20w1s": dict(
        algorithm="anil",
        dataset="omniglot",
        ways=20,
        shots=1,
        queries=1,
        meta_batch=16,  # cbfinn/maml main.py 20-way: --meta_batch_size=16
        inner_steps=5,  # --num_updates=5
        inner_lr=0.1,  # --update_lr=0.1
        test_inner_steps=5,  # Finn et al. 2017, App. A.1: 5 steps at test (20-way)
        steps=60_000,  # --metatrain_iterations=60000
    ),
}

SOURCES = {
    "fomaml-omniglot-5w1s": "Finn et al. 2017 (first-order); cbfinn/maml main.py",
    "reptile-omniglot-5w1s": f"Nichol et al. 2018; {_REPTILE}",
    "protonet-omniglot-5w1s": f"Snell et al. 2017, Sec. 3.1; {_PROTONET}",
    "meta-sgd-omniglot-5w1s": "Li et al. 2017 (no code); MAML's Omniglot protocol",
    "maml-plus-plus-omniglot-5w1s": f"Antoniou et al. 2019; {_MAMLPP}",
    "imaml-omniglot-5w1s": f"Rajeswaran et al. 2019; {_IMAML}",
    "anil-omniglot-20w1s": "Raghu et al. 2020; cbfinn/maml 20-way protocol",
}

NOT_HONOURED = {
    "reptile-omniglot-5w1s": (
        "Each inner step uses all 50 training examples (the authors draw "
        "mini-batches of 10, --inner-batch 10); the authors' Adam moments carry "
        "over from task to task (only the weights are reset), ours start afresh "
        "each task; the authors do not rotate test characters, and their split is "
        "1200 shuffled characters."
    ),
    "protonet-omniglot-5w1s": (
        "A fixed 20,000 episodes instead of early stopping on validation loss and "
        "retraining on train+val (run_trainval.py); 600 test episodes (theirs "
        "1000)."
    ),
    "meta-sgd-omniglot-5w1s": (
        "Rates start at 0.0525 each, not drawn from U[0.005, 0.1]; iteration "
        "count and meta-batch are MAML's, not confirmed in the Meta-SGD paper."
    ),
    "maml-plus-plus-omniglot-5w1s": (
        "The authors' batch norm always normalises with the batch's statistics "
        "(F.batch_norm(training=True)), so their per-step running statistics go "
        "unused; ours use them at test, as the paper describes BNRS. The cosine "
        "schedule steps per iteration (theirs per 500-iteration epoch); no "
        "ensemble of the best validation checkpoints; the Vinyals split instead "
        "of their 70.9/3.1/26.1% character split."
    ),
    "imaml-omniglot-5w1s": (
        "Ours solves the proximal problem by gradient descent on "
        "L_S + λ/2‖φ − θ‖² (16 steps) and solves (I + (H + δ)/λ) v = g; the "
        "authors' code takes 16 plain SGD steps then one proximal pull-back, "
        "solves ((1 + δ) I + H/(λ + 10)) v = g, adapts at test without the "
        "proximal term (--lam 0.0) and uses Adam with ε = 1e-3."
    ),
    "anil-omniglot-20w1s": (
        "Values are MAML's 20-way protocol; ANIL's own settings were not checked "
        "against the authors' code."
    ),
    "fomaml-omniglot-5w1s": "",
}
