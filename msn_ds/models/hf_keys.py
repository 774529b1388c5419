"""The ViT's parameter names in Hugging Face's ``ViTMSNModel`` (the ``facebook/vit-msn-*``
checkpoints): one table for msn_ds/io/hf.py's export and import, so that an
exported folder always imports back to the same weights."""

LAYER_NORM_EPS = 1e-6  # build_vit's; transformers' ViTMSNConfig default is 1e-6 too
# timm block key (after ``blocks.N.``) -> transformers key (after ``encoder.layer.N.``)
BLOCK_MAP = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
TOP_MAP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
QKV = ("query", "key", "value")  # the fused qkv's three parts, in its order
