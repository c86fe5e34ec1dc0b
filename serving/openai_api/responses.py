"""OpenAI response bodies and stream chunks, built from the model's outputs (triton.Output).

Choice ``index`` runs over prompts, then over the ``n`` sequences of each prompt, as in
OpenAI's API. Log-probabilities come from the model's ``logprobs`` output: per token,
``{"token_id", "candidates": {id: {"logprob", "rank", "decoded_token"}}}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serving.openai_api.triton import Output


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list = field(default_factory=list)  # the model's per-token entries
    started: bool = False  # a chat stream sent this choice's role


class Choices:
    """The answer to one request in the making: the text, counts and log-probabilities of every choice."""

    def __init__(self, kind: str, request_id: str, request, logprobs_style: str):
        self.kind = kind  # "text_completion" or "chat.completion"
        self.id = request_id
        self.request = request
        self.chat = logprobs_style == "chat"
        self.want_logprobs = request.logprobs not in (None, False)
        self.top = (request.top_logprobs or 0) if self.chat else request.logprobs
        self.created = int(time.time())
        self.choices: dict[int, Choice] = {}
        self.prompt_tokens: dict[int, int] = {}

    def _update(self, prompt: int, output: Output) -> list[tuple[int, Choice, str, list]]:
        """Add one output; return, per choice it touched: index, choice, new text, new log-probabilities."""
        self.prompt_tokens[prompt] = output.num_input_tokens
        touched = []
        for seq, text in enumerate(output.texts):
            index = prompt * self.request.n + seq
            choice = self.choices.setdefault(index, Choice())
            new_logprobs = output.logprobs[seq] or []
            choice.text += text
            choice.tokens += output.num_output_tokens[seq]
            choice.logprobs += new_logprobs
            choice.finish_reason = output.finish_reasons[seq] or choice.finish_reason
            # A new token whose text the detokenizer still holds back (part of a UTF-8
            # character) gets its chunk too, with empty text, as vLLM's server sends it:
            # clients time the first token and count usage from it.
            if text or new_logprobs or output.num_output_tokens[seq] or output.finish_reasons[seq]:
                touched.append((index, choice, text, new_logprobs))
        return touched

    def add(self, prompt: int, output: Output) -> None:
        self._update(prompt, output)

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(c.tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def final(self) -> dict:
        """The non-streamed body."""
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            entry = {"index": index, "logprobs": self._logprobs(c.logprobs, 0), "finish_reason": c.finish_reason}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": c.text}
            else:
                entry["text"] = c.text
            choices.append(entry)
        return {**self._head(self.kind), "choices": choices, "usage": self.usage()}

    def chunks(self, prompt: int, output: Output) -> list[dict]:
        """The stream chunks for one output of prompt number ``prompt``."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        usage = {"usage": None} if self.request.include_usage() else {}
        chunks = []
        for index, choice, text, new_logprobs in self._update(prompt, output):
            entry = {"index": index}
            if self.chat:
                entry["delta"] = {"content": text} if choice.started else {"role": "assistant", "content": text}
                choice.started = True
            else:
                entry["text"] = text
            offset = len(choice.text) - len(text)
            entry["logprobs"] = self._logprobs(new_logprobs, offset)
            entry["finish_reason"] = choice.finish_reason
            chunks.append({**self._head(kind), "choices": [entry], **usage})
        if chunks and self.request.continuous_usage():
            chunks[-1]["usage"] = self.usage()
        return chunks

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage()}

    def _logprobs(self, steps: list, offset: int) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [chat_logprob(step, self.top) for step in steps]}
        return completion_logprobs(steps, offset)


def token_text(candidate: dict) -> str:
    return candidate.get("decoded_token") or ""


def ranked(step: dict) -> list[dict]:
    return sorted(step["candidates"].values(), key=lambda c: c["rank"] or 0)


def chat_logprob(step: dict, top: int) -> dict:
    sampled = step["candidates"][str(step["token_id"])]
    token = token_text(sampled)
    return {
        "token": token,
        "logprob": sampled["logprob"],
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {"token": token_text(c), "logprob": c["logprob"], "bytes": list(token_text(c).encode("utf-8"))}
            for c in ranked(step)[:top]
        ],
    }


def completion_logprobs(steps: list, offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for step in steps:
        sampled = step["candidates"][str(step["token_id"])]
        tokens.append(token_text(sampled))
        token_logprobs.append(sampled["logprob"])
        top_logprobs.append({token_text(c): c["logprob"] for c in ranked(step)})
        offsets.append(offset)
        offset += len(token_text(sampled))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
