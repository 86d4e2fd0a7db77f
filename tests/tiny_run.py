"""Command-line flags of a tiny pipeline run on the synthetic world, for the tests that run
the pipeline or the CLI end to end: TINY (the world, the model, every stage's sizes) and
LEARNED (to add to TINY: the learned policies' nets and steps)."""

TINY = [
    "--data.task=world_qa",
    "--data.corpus=world",
    "--world.num_people=40",
    "--world.num_bios=2",
    "--data.mlm_length=24",
    "--data.mlm_target_length=12",
    "--data.source_length=16",
    "--data.target_length=8",
    "--model.d_model=32",
    "--model.encoder_layers=1",
    "--model.decoder_layers=1",
    "--model.encoder_attention_heads=4",
    "--model.decoder_attention_heads=4",
    "--model.encoder_ffn_dim=64",
    "--model.decoder_ffn_dim=64",
    "--model.max_position_embeddings=32",
    "--model.vocab_size=0",
    "--model.dropout=0.1",  # dropout on: resume must reproduce its randomness too
    "--policy.name=salient_spans",
    "--policy.spans_per_sentence=1",
    "--intermediate.batch_size=8",
    "--intermediate.optim.learning_rate=1e-3",
    "--finetune.batch_size=8",
    "--finetune.steps=4",
    "--finetune.checkpoint_every=2",
    "--eval.max_examples=16",
    "--eval.batch_size=8",
]

LEARNED = [
    "--meta.policy_d_model=16",
    "--meta.policy_ffn_dim=32",
    "--meta.policy_layers=1",
    "--meta.policy_heads=2",
    "--supervised.steps=20",
    "--supervised.eval_every=10",
    "--meta.meta_steps=4",
    "--meta.mask_rate=0.15",  # TINY masks one span per sentence: meta-learning samples a rate
    "--meta.inner_batch_size=4",
    "--meta.outer_batch_size=4",
    "--intermediate.steps=3",
    "--stages=learn_policy,intermediate",
]
