"""Text out: stop strings, streaming deltas, incremental detokenization of byte-level tokens,
and chat templates, on the default checkpoint's real tokenizer and a byte-level BPE."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import jaxtp
from jaxtp.entrypoints.detokenize import TextStream
from jaxtp.entrypoints.outputs import Request

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-arith"
GREEDY = dict(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return jaxtp.load(DEFAULT, tp=2, dtype="float32")


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE whose merges split multi-byte characters across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["héllo wörld, naïve café 🙂 stop here"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A byte-fallback BPE laid out as Llama-2's tokenizer.json: "▁" marks a word's space (the
    normaliser prepends one and replaces spaces), the decoder turns it back and strips the
    first one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # for training only
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["Tom and Lily were playing in the park.", "They played all day, café crème."] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prompt,completion", [("Tom and Lily were playing", " in the park"),
                                               ("They played all", " day, café crème.")])
def test_the_space_after_the_prompt_survives_sentencepiece_decoding(sentencepiece_tokenizer, prompt, completion):
    tok = sentencepiece_tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    new = tok(prompt + completion)["input_ids"][len(prompt_ids):]
    assert tok.convert_ids_to_tokens(new)[0].startswith("▁")  # the space rides on the first new token
    want = tok.decode(prompt_ids + new)[len(tok.decode(prompt_ids)):]
    assert want == completion
    params = jaxtp.SamplingParams(max_tokens=len(new))
    req = Request("0", prompt, prompt_ids, params, tok)
    seq, streamed = req.seqs[0], ""
    for t in new:  # one token per update, as a stream delivers them
        seq.tokens.append(t)
        streamed += req.update(seq).text
    seq.finish("length")
    streamed += req.update(seq).text
    assert streamed == want and req.output().outputs[0].text == want


def test_stop_string_spanning_tokens(model):
    plain = jaxtp.generate(model, ["408+199="], jaxtp.SamplingParams(**GREEDY))[0]
    assert plain.text == "607"
    out = jaxtp.generate(model, ["408+199="], jaxtp.SamplingParams(stop=["x", "07"], **GREEDY))[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("6", "stop", "07")
    assert out.token_ids == plain.token_ids[:3]  # through the token that completed "07"
    kept = jaxtp.generate(model, ["408+199="], jaxtp.SamplingParams(stop="07", include_stop_str_in_output=True,
                                                                     **GREEDY))[0]
    assert kept.text == "607"


def test_stream_deltas_add_up_to_the_generated_text(model):
    prompts = ["17+25=", "999+999=", "3+4="]
    params = jaxtp.SamplingParams(**GREEDY)
    want = jaxtp.generate(model, prompts, params)
    texts, ids, reasons, events = {}, {}, {}, 0
    for d in jaxtp.stream(model, prompts, params, chunk=1):
        key = d.request.prompt
        texts[key] = texts.get(key, "") + d.text
        ids[key] = ids.get(key, []) + d.token_ids
        reasons[key] = d.finish_reason
        events += 1
    assert events > len(prompts)  # token by token, not all at the end
    for w in want:
        assert (texts[w.prompt], ids[w.prompt], reasons[w.prompt]) == (w.text, w.token_ids, w.finish_reason)


def test_stream_never_releases_the_start_of_a_stop_string(model):
    deltas = [d.text for d in jaxtp.stream(model, ["408+199="], jaxtp.SamplingParams(stop="07", **GREEDY),
                                           chunk=1)]
    assert "".join(deltas) == "6" and "0" not in "".join(deltas)


def test_byte_level_stream_never_splits_a_character(byte_tokenizer):
    text = "naïve café 🙂 héllo wörld"
    ids = byte_tokenizer(text)["input_ids"]
    assert any("\ufffd" in byte_tokenizer.decode([i]) for i in ids)  # the test has teeth
    stream = TextStream(byte_tokenizer)
    deltas = []
    for t in ids:
        stream.add(t)
        deltas.append(stream.release(final=False))
    deltas.append(stream.release(final=True))
    assert "".join(deltas) == byte_tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_byte_level_stop_string_cuts_text_mid_token(byte_tokenizer):
    ids = byte_tokenizer("héllo wörld, stop here")["input_ids"]
    stream = TextStream(byte_tokenizer, stop=["rld, s"])
    for n, t in enumerate(ids, 1):
        if stream.add(t):
            break
    assert stream.text == "héllo wö" and stream.stop_str == "rld, s"
    assert byte_tokenizer.decode(ids[:n]).endswith("rld, s") or "rld, s" in byte_tokenizer.decode(ids[:n])
    assert "rld, s" not in byte_tokenizer.decode(ids[:n - 1])


def test_chat_uses_the_template(model):
    llm = jaxtp.LLM(model=str(DEFAULT), tensor_parallel_size=2, dtype="float32")
    convs = [[{"role": "user", "content": "17+25="}],
             [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "250+250="}]]
    outs = llm.chat(convs, jaxtp.SamplingParams(**GREEDY))
    assert [o.outputs[0].text for o in outs] == ["42", "500"]
    assert outs[0].prompt_token_ids == model.tokenizer("17+25=")["input_ids"]
    assert llm.chat(convs[0], jaxtp.SamplingParams(**GREEDY))[0].outputs[0].text == "42"
    with pytest.raises(ValueError, match=r"messages must be a list of \{'role': ..., 'content': ...\} dicts"):
        llm.chat([{"content": "no role"}])
