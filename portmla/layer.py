class MLAAttention: pass
class MLABatch: pass
