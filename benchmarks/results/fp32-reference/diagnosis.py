"""Where does compiled bf16 LoRA part from the fp32 reference? Manual loop, same data."""
import copy, json, os, sys, time, torch, torch._dynamo, torch._inductor.config
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
layers = int(os.environ.get("LAYERS", 8)); accum = int(os.environ.get("ACCUM", 8))
dev = os.environ.get("DEV", "cuda")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
with torch.device(dev):
    base_cpu = LlamaForCausalLM(cfg)
    for p_ in base_cpu.parameters():
        p_.data = p_.data.to(torch.bfloat16).float()  # the same weights in every dtype
g = torch.Generator().manual_seed(1)
template = torch.randint(3, 32000, (60,), generator=g)
def row():
    n = int(torch.randint(20, 120, (1,), generator=g))
    return torch.cat([template, torch.randint(3, 400, (n,), generator=g)])
batches = []
for s in range(3):
    step = []
    for m in range(accum):
        a, b = row(), row()
        L = max(len(a), len(b))
        ids = torch.zeros(2, L, dtype=torch.long); lab = torch.full((2, L), -100); att = torch.zeros(2, L, dtype=torch.long)
        for i, r in enumerate((a, b)):
            ids[i, :len(r)] = r; lab[i, :len(r)] = r; att[i, :len(r)] = 1
        step.append((ids, lab, att))
    batches.append(step)
def make(dtype, dropout, compiled):
    m = copy.deepcopy(base_cpu).to(dtype).to(dev); m.config.use_cache = False
    torch.manual_seed(7)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], task_type="CAUSAL_LM"))
    if compiled:
        torch._dynamo.config.cache_size_limit = 64
        for mod in m.modules():
            if type(mod).__name__.endswith("DecoderLayer"):
                mod.compile(dynamic=True)
    return m
def run(name, dtype, dropout=0.05, compiled=False, **inductor):
    ic = torch._inductor.config
    old = {k: getattr(ic, k) for k in inductor}
    for k, v in inductor.items(): setattr(ic, k, v)
    torch._dynamo.reset()
    t = time.time()
    m = make(dtype, dropout, compiled); m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    dts = sorted({str(p.dtype) for p in params})
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0, fused=dev == "cuda")
    out = []
    for s, step in enumerate(batches):
        ntok = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in step)
        tot = 0.0
        for ids, lab, att in step:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = m(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1).to(dev), ignore_index=-100, reduction="sum") / ntok
            loss.backward(); tot += loss.item()
        gn = torch.nn.utils.clip_grad_norm_(params, 0.3)
        # how many A elements got a nonzero gradient at step 1 (B is zero there)
        if s == 0:
            a_nz = sum(int((p.grad != 0).sum()) for n_, p in m.named_parameters() if "lora_A" in n_ and p.grad is not None)
        opt.step(); opt.zero_grad(set_to_none=True)
        out.append((round(tot, 5), round(gn.item(), 5)))
    for k, v in old.items(): setattr(ic, k, v)
    print(json.dumps({"path": name, "loss_gradnorm": out, "A_nonzero_grad_step1": a_nz, "param_dtypes": dts, "s": round(time.time() - t, 1)}), flush=True)
    del m, opt; torch.cuda.empty_cache()
which = sys.argv[1:] or ["fp32", "bf16", "bf16c", "bf16c-emu", "bf16c-nodrop", "bf16-nodrop", "bf16c-fallbackrng"]
for w in which:
    {"fp32": lambda: run("fp32 eager", torch.float32),
     "fp32c": lambda: run("fp32 compiled", torch.float32, compiled=True),
     "bf16": lambda: run("bf16 eager", torch.bfloat16),
     "bf16c": lambda: run("bf16 compiled", torch.bfloat16, compiled=True),
     "bf16c-emu": lambda: run("bf16 compiled emulate_precision_casts", torch.bfloat16, compiled=True, emulate_precision_casts=True),
     "bf16c-nodrop": lambda: run("bf16 compiled dropout 0", torch.bfloat16, dropout=0.0, compiled=True),
     "bf16-nodrop": lambda: run("bf16 eager dropout 0", torch.bfloat16, dropout=0.0),
     "bf16c-fallbackrng": lambda: run("bf16 compiled fallback_random", torch.bfloat16, compiled=True, fallback_random=True),
    }[w]()
