"""Which config.json variants transformers 5.24 accepts for gemma4 (run by hand, in a scratch
venv with `pip install transformers==5.24.0`; no torch needed). Each OK line is a case that
`configs_transformers_accepts_load` in src/model/config.rs loads too. Output on 2026-12-03:
the four FAILs are null `sliding_window` / `hidden_size_per_layer_input` /
`tie_word_embeddings` and a float `hidden_size` (strict dataclass type checks); all other
cases are OK. Note that transformers also accepts disagreeing `eoa_token_id` /
`eoa_token_index`; percept refuses those in one line, as issue 14 asks.
"""
import json, copy, warnings, logging
logging.disable(logging.WARNING)
from transformers import Gemma4Config, AutoConfig
from transformers.models.gemma4_unified import Gemma4UnifiedConfig
base = {"model_type":"gemma4","architectures":["Gemma4ForConditionalGeneration"],
 "text_config":{"model_type":"gemma4_text","hidden_size":64,"intermediate_size":96,"num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":16,"global_head_dim":32,"vocab_size":320,"vocab_size_per_layer_input":320,"hidden_size_per_layer_input":8,"num_kv_shared_layers":2},
 "vision_config":None,"audio_config":None,"eoa_token_index":258883}
def tryit(name, mut, cls=Gemma4Config):
    c = copy.deepcopy(base); mut(c)
    try:
        cfg = cls.from_dict(c); print("OK  ", name)
    except Exception as e:
        print("FAIL", name, type(e).__name__, str(e)[:150].replace("\n"," "))
tryit("plain", lambda c: None)
tryit("legacy top", lambda c: c.update({"_name_or_path":"x","architectures":None,"id2label":{"0":"A"},"label2id":{"A":0},"dtype":"bfloat16","torch_dtype":"float32","chunk_size_feed_forward":0,"transformers_version":"5.5.0","initializer_range":0.02}))
tryit("legacy text", lambda c: c["text_config"].update({"_name_or_path":"x","architectures":None,"id2label":{"0":"A"},"label2id":{"A":0},"dtype":"bfloat16","torch_dtype":"bfloat16","chunk_size_feed_forward":0,"use_cache":True,"attention_dropout":0.0}))
tryit("both eoa agree", lambda c: c.update({"eoa_token_id":258883}))
tryit("both eoa disagree", lambda c: c.update({"eoa_token_id":7}))
tryit("null boi", lambda c: c.update({"boi_token_id":None}))
tryit("null sliding", lambda c: c["text_config"].update({"sliding_window":None}))
tryit("null ple", lambda c: c["text_config"].update({"hidden_size_per_layer_input":None}))
tryit("null softcap", lambda c: c["text_config"].update({"final_logit_softcapping":None}))
tryit("null layer_types", lambda c: c["text_config"].update({"layer_types":None}))
tryit("null rope", lambda c: c["text_config"].update({"rope_parameters":None}))
tryit("null pad", lambda c: c["text_config"].update({"pad_token_id":None, "bos_token_id":None, "eos_token_id":None}))
tryit("eos list", lambda c: c["text_config"].update({"eos_token_id":[1,106]}))
tryit("null text_config", lambda c: c.update({"text_config":None}))
tryit("vision null fields", lambda c: c.update({"vision_config":{"model_type":"gemma4_vision","hidden_size":32,"attention_bias":None,"rope_parameters":None,"_name_or_path":"","torch_dtype":"bfloat16"}}))
tryit("audio legacy", lambda c: c.update({"audio_config":{"model_type":"gemma4_audio","hidden_size":32,"_name_or_path":"","dtype":"bfloat16","id2label":{"0":"a"}}}))
tryit("rope extra keys", lambda c: c["text_config"].update({"rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":10000.0},"full_attention":{"rope_type":"proportional","partial_rotary_factor":0.25,"rope_theta":1e6,"extra":1}}}))
tryit("int as float", lambda c: c["text_config"].update({"hidden_size":64.0}))
tryit("rope_theta int", lambda c: c["text_config"].update({"rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":10000},"full_attention":{"rope_type":"proportional","partial_rotary_factor":0.25,"rope_theta":1000000}}}))
tryit("use_bidir null", lambda c: c["text_config"].update({"use_bidirectional_attention":None}))
tryit("tie null", lambda c: c.update({"tie_word_embeddings":None}))
tryit("eoa null", lambda c: c.update({"eoa_token_index":None}))
