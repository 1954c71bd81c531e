"""Built-in presets: the real public shapes of MoE models, as config kwargs for `AutoConfig.for_model`.

Only the config is needed (calibration builds one experts layer with random weights), so presets need no download.
Each public entry copies its checkpoint's published config.json (architecture, attention, MoE and router fields;
token ids, dtype and quantisation left out); the comment above it names where the values were checked. Their
experts layers match the published parameter counts when built on the meta device.
"""

DEFAULT_PRESET = "small-moe"

PRESETS: dict[str, dict] = {
    # A small Qwen3-MoE-class layer for the quick default calibration (not a public model).
    "small-moe": {
        "hub_id": None,
        "model_type": "qwen3_moe",
        "config": {
            "hidden_size": 512,
            "intermediate_size": 1024,
            "moe_intermediate_size": 256,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "num_hidden_layers": 1,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 64,
            "vocab_size": 1024,
        },
    },
    # Qwen/Qwen1.5-MoE-A2.7B  (model_type qwen2_moe)
    # Source: the base checkpoint's config.json as reproduced in derivative repos whose
    # _name_or_path is "Qwen/Qwen1.5-MoE-A2.7B" (e.g. huggingface.co/MaziyarPanahi/Qwen1.5-MoE-A2.7B-Wikihow,
    # huggingface.co/RichardErkhov/Qwen_-_Qwen1.5-MoE-A2.7B-8bits, huggingface.co/jayzeng/llm-fun);
    # the same MoE values appear in Qwen/Qwen1.5-MoE-A2.7B-Chat(-GPTQ-Int4) config.json and they are
    # the defaults of transformers' Qwen2MoeConfig (docstring checkpoint "Qwen/Qwen1.5-MoE-A2.7B").
    # max_position_embeddings: 8192 in the base copies (the -Chat config has 32768).
    # sliding_window 32768 is the published value; Qwen2MoeConfig stores 0 because use_sliding_window is False.
    # 24 layers, decoder_sparse_step 1 -> every layer is sparse; one shared expert (5632) with a sigmoid gate.
    "qwen1.5-moe-a2.7b": {
        "hub_id": "Qwen/Qwen1.5-MoE-A2.7B",
        "model_type": "qwen2_moe",
        "config": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 21,
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "router_aux_loss_coef": 0.001,
        },
    },
    # Qwen/Qwen3-30B-A3B  (model_type qwen3_moe)
    # Source: full copy of Qwen/Qwen3-30B-A3B config.json in a public collection of HF configs
    # (GitHub index, file id 30247352769); MoE values corroborated by vllm-ascend tests
    # (QWEN3_30B_A3B_CONFIG), slime scripts/models/qwen3-30B-A3B.sh and MindSpeed-RL qwen3_30b_a3b.yaml.
    # 48 layers, all sparse (decoder_sparse_step 1, mlp_only_layers []), no shared expert.
    "qwen3-30b-a3b": {
        "hub_id": "Qwen/Qwen3-30B-A3B",
        "model_type": "qwen3_moe",
        "config": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 48,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "router_aux_loss_coef": 0.001,
        },
    },
    # mistralai/Mixtral-8x7B-v0.1  (model_type mixtral)
    # Source: official huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1 config.json (rev eba9230) and
    # derivative copies of the base config with _name_or_path "mistralai/Mixtral-8x7B-v0.1"
    # (YeungNLP/firefly-mixtral-8x7b, rufjdk5480/gov-qna-ko-merged) - identical architecture values.
    # The base repo's own config.json page itself was not found in the stored copies.
    # Experts: 8 x (w1/w3 14336, w2), top-2, no shared expert.
    "mixtral-8x7b": {
        "hub_id": "mistralai/Mixtral-8x7B-v0.1",
        "model_type": "mixtral",
        "config": {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02,
        },
    },
    # allenai/OLMoE-1B-7B-0924  (model_type olmoe)
    # Source: official huggingface.co/allenai/OLMoE-1B-7B-0924/blob/c1b31da0c8e885c688902634d444982ca419aa33/config.json
    # (commit "Fix load balancing coefficient": router_aux_loss_coef 0.01; the earlier revision fba02cf had 0.001).
    # The file has no rms_norm_eps key; OlmoeConfig's default 1e-05 applies (same as the -Instruct configs).
    # Note intermediate_size 1024 is the per-expert width (OlmoeConfig's own default is 2048).
    "olmoe-1b-7b": {
        "hub_id": "allenai/OLMoE-1B-7B-0924",
        "model_type": "olmoe",
        "config": {
            "vocab_size": 50304,
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "clip_qkv": None,
            "tie_word_embeddings": False,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "router_aux_loss_coef": 0.01,
        },
    },
    # openai/gpt-oss-20b  (model_type gpt_oss)
    # Source: the HF-format config.json as carried by derivative repos of openai/gpt-oss-20b
    # (huggingface.co/inference-optimization/gpt-oss-20b-FP8-Dynamic, cryptonaut/AltiMind-sft,
    # leeloolee/oss-math), the official gpt-oss-120b config.json (same file, 36 layers / 128 experts)
    # quoted in a test, tinygrad examples/gpt_oss.py (20b "original" config: 24 layers, 32 experts,
    # 4 per token, swiglu_limit 7.0) and the NVIDIA Megatron-Bridge model page.
    # experts_per_token / initial_context_length are extra keys of the published file (GptOssConfig
    # keeps them as plain attributes).  swiglu_alpha is not in config.json: 1.702 is hard-wired by
    # transformers (GptOssConfig default), so it is not listed here.
    "gpt-oss-20b": {
        "hub_id": "openai/gpt-oss-20b",
        "model_type": "gpt_oss",
        "config": {
            "vocab_size": 201088,
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_hidden_layers": 24,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "hidden_act": "silu",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "max_position_embeddings": 131072,
            "initial_context_length": 4096,
            "rms_norm_eps": 1e-05,
            "rope_theta": 150000,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * 12,
            "tie_word_embeddings": False,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "experts_per_token": 4,
            "router_aux_loss_coef": 0.9,
            "swiglu_limit": 7.0,
        },
    },
    # deepseek-ai/DeepSeek-V3  (model_type deepseek_v3)
    # Source: the HF config.json of deepseek-ai/DeepSeek-V3 as reproduced by derivative repos
    # (huggingface.co/JPAdams12th/dormant-model-2, GreenBitAI/DeepSeek-R1-671B..., amd/DeepSeek-R1-MXFP4,
    # cann-recipes-train llm_rl/deepseek config.json), cross-checked against the official
    # deepseek-ai/DeepSeek-V3 GitHub inference/configs/config_671B.json (dim 7168, inter_dim 18432,
    # moe_inter_dim 2048, n_layers 61, n_dense_layers 3, n_heads 128, 256 routed / 1 shared / 8 activated,
    # n_expert_groups 8, n_limited_groups 4, route_scale 2.5, score_func sigmoid, q_lora_rank 1536,
    # kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head_dim 128, vocab 129280) and against
    # transformers' DeepseekV3Config defaults, which carry the same numbers.
    # Left out: topk_method "noaux_tc", scoring_func "sigmoid", moe_layer_freq 1, ep_size 1,
    # aux_loss_alpha/seq_aux (not DeepseekV3Config fields: transformers always uses sigmoid +
    # e_score_correction_bias group-limited routing) and quantization_config (fp8, e4m3, 128x128 blocks).
    # Layers 0..2 are dense (first_k_dense_replace 3); layers 3..60 are MoE.  NOTE: a build with
    # num_hidden_layers=1 (and first_k_dense_replace 3) has NO experts module; override
    # first_k_dense_replace=0 (or keep >= 4 layers) to get one MoE layer.
    "deepseek-v3": {
        "hub_id": "deepseek-ai/DeepSeek-V3",
        "model_type": "deepseek_v3",
        "config": {
            "vocab_size": 129280,
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 61,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 163840,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "n_routed_experts": 256,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "n_group": 8,
            "topk_group": 4,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "first_k_dense_replace": 3,
            "num_nextn_predict_layers": 1,
        },
    },
    # upstage/Solar-Open-100B  (model_type solar_open)
    # Source: official huggingface.co/upstage/Solar-Open-100B/blob/main/config.json; every MoE value
    # also equals the defaults of the installed transformers SolarOpenConfig (docstring checkpoint
    # "upstage/Solar-Open-100B"). hidden_act, n_group, topk_group are absent from the hub file; the
    # SolarOpenConfig defaults ("silu", 1, 1) apply.
    # Left out on purpose: the hub file's "intermediate_size": 10240 and "first_k_dense_replace": 0 -
    # transformers' SolarOpen deletes both fields (no dense layers; the shared expert's width is
    # moe_intermediate_size * n_shared_experts = 1280), so passing them would only add dead attributes.
    "solar-open-100b": {
        "hub_id": "upstage/Solar-Open-100B",
        "model_type": "solar_open",
        "config": {
            "vocab_size": 196608,
            "hidden_size": 4096,
            "num_hidden_layers": 48,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000,
            "rope_scaling": {
                "type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 65536,
            },
            "partial_rotary_factor": 1.0,
            "tie_word_embeddings": False,
            "moe_intermediate_size": 1280,
            "n_routed_experts": 128,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
        },
    },
}
