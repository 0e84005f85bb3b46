"""The online half: a Milvus gallery whose items remember the model generation that embedded them, a model
registry with a compatibility gate, and a crash-safe background backfill."""
