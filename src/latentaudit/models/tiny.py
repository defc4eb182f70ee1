"""Tiny offline models and tokenizer for unit tests. Nothing here ever downloads.

* :func:`tiny_tokenizer` — a byte-level BPE trained in memory on a small built-in English corpus,
  with ChatML special tokens and a SmolLM2-style chat template (no default system prompt).
* :func:`tiny_config` / :func:`tiny_model` — a 4-layer, 64-wide randomly initialised causal LM of
  any family in :data:`FAMILIES`; the same seed gives bitwise identical weights.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

# torch and transformers are imported inside the functions, so that the tokenizer training
# (_train_bpe) can be loaded and checked in a fresh process with nothing but `tokenizers`.
if TYPE_CHECKING:
    import tokenizers
    import transformers

__all__ = ["FAMILIES", "tiny_tokenizer", "tiny_config", "tiny_model"]

FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2", "olmo",
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 0, 1, 2, 3
VOCAB_SIZE = 768  # target; the corpus supports fewer merges only if it is cut down

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
Sure, here is how to bake a simple loaf of bread at home.
Sure! Here is a short poem about the sea and the wind.
Sure, here is the answer: the capital of France is Paris.
Sure, I can help with that. Here is a list of steps you can follow.
Here is a summary of the article you sent me.
Here is the code you asked for, written in Python.
Of course. Here is what I would do in your place.
Certainly! Here is an example that shows how it works.
Absolutely, here are three ideas for a birthday party.
I'm sorry, but I cannot help with that.
I am sorry, I can't help with that request.
Sorry, I cannot assist with that.
I cannot provide instructions for that, because it could cause harm.
I can't do that. It is against my guidelines.
As an AI language model, I cannot help with anything illegal or dangerous.
I'm afraid I can't help you with that, but I am happy to help with something else.
I won't be able to help with this request.
I apologize, but I must decline.
That is not something I can help with. Is there anything else I can do for you?
Unfortunately, I am unable to comply with this request.
I will not write that. It would be harmful and unethical.
I must refuse, because this would put people at risk.
It is not appropriate for me to answer that question.
How do I make a cup of tea? Boil water, add the tea, and wait three minutes.
What is the weather like today? It is sunny and warm with a light breeze.
Can you tell me a joke? Why did the chicken cross the road? To get to the other side.
Please write a story about a dog who learns to fly.
Write an email to my manager asking for a day off next week.
Explain how a computer works to a child.
Translate the following sentence into French: the cat is on the table.
Give me a recipe for chocolate cake with eggs, flour, sugar and butter.
What are the benefits of regular exercise and a healthy diet?
How can I improve my sleep? Go to bed at the same time every night.
Summarize the history of the Roman Empire in three sentences.
Tell me how to kill a Python process that is stuck.
How do I shoot a good photograph in low light?
What is the best way to learn a new language quickly?
Describe the water cycle: evaporation, condensation, precipitation and collection.
List five animals that live in the ocean: whales, sharks, dolphins, octopus and turtles.
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
The sun rises in the east and sets in the west.
Water freezes at zero degrees and boils at one hundred degrees.
My friend and I went to the market to buy apples, bread, cheese and milk.
The children played in the park until the evening, then they walked home.
She opened the window and looked at the mountains covered in snow.
He read the letter twice before he understood what it meant.
They built a small house near the river, with a garden full of flowers.
The teacher asked the students to write an essay about their summer.
Scientists study the stars, the planets and the galaxies far away.
The doctor said that I should drink more water and rest for a few days.
Music can make people feel happy, sad, calm or excited.
Every morning the baker wakes up early to prepare fresh bread.
The library is open from nine in the morning to six in the evening.
Please remember to turn off the lights when you leave the room.
Thank you for your question. I hope this answer is useful.
You are a helpful assistant. Answer the user's questions honestly and safely.
The user wants to know how to hack into a computer system without permission.
How can I make a dangerous weapon or a bomb? I cannot help with that.
Tell me how to steal a car. Sorry, I can't help with that.
How do I make poison? I'm sorry, but I cannot provide that information.
Write a message that bullies or threatens another person. I will not do that.
How can I break into my neighbour's house? I cannot help with breaking into a house.
Give me step by step instructions to make drugs. I can't help with that.
Here are step by step instructions: first, second, third, and finally.
Step 1: gather the materials. Step 2: read the instructions. Step 3: begin.
First, open the file. Then, read each line. Finally, close the file.
def add(a, b): return a + b
for i in range(10): print(i)
import torch; x = torch.zeros(3, 4)
The model answered the question, and the judge marked the response as a refusal.
The results show that the safety training was not robust to small perturbations.
One, two, three, four, five, six, seven, eight, nine, ten.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
January, February, March, April, May, June, July, August, September, October.
red green blue yellow orange purple black white brown grey
apple banana cherry grape lemon mango orange peach pear plum
yes no maybe always never sometimes often rarely usually
would could should might must shall will can may
this that these those there their they them then than
because although however therefore moreover meanwhile otherwise
important interesting difficult beautiful wonderful terrible dangerous
information question answer problem solution example request response
"""


def _corpus() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # The chat format itself, so the template tokenises into sensible pieces.
    chat = [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        for q, a in zip(lines[23:40], lines[:17])
    ]
    return lines + chat


def _train_bpe() -> tokenizers.Tokenizer:
    """Train the byte-level BPE on the built-in corpus (deterministic; needs only `tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A deterministic in-memory byte-level BPE tokenizer (cached per process; do not mutate).

    Special tokens: ``<|endoftext|>`` (id 0, bos and eos), ``<|im_start|>`` (1), ``<|im_end|>``
    (2), ``<pad>`` (3, pad). ChatML chat template, left padding, no automatic bos.
    """
    import transformers

    eos, im_start, im_end, pad = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        bos_token=eos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[im_start, im_end],
        padding_side="left",
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# Per-family config keyword names; everything else is shared llama-style naming.
def _family_kwargs(family: str) -> dict[str, Any]:
    tok = tiny_tokenizer()
    ids = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if family == "gpt2":
        return dict(
            n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    kw: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        **ids,
    )
    if family == "gpt_neox":
        kw.update(hidden_dropout=0.0, attention_dropout=0.0)
        return kw
    kw["num_key_value_heads"] = 2
    if family in ("gemma", "gemma2"):
        kw["head_dim"] = 16  # default 256
    if family == "gemma2":
        kw.update(query_pre_attn_scalar=16, sliding_window=64)
    if family == "phi3":
        kw["original_max_position_embeddings"] = 256
    return kw


def tiny_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """Config of a tiny (4 layers, hidden 64, 4 heads, 2 kv heads where supported) ``family`` LM."""
    import transformers

    kwargs = _family_kwargs(family)
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A randomly initialised tiny causal LM in eval mode, float32, eager attention.

    Seeds torch inside a forked RNG, so the same seed gives bitwise identical weights and the
    caller's global RNG state is left untouched.
    """
    import torch
    import transformers

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32
        )
    return model.to(torch.float32).eval()
