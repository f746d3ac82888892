"""ChatQZoom: a LangChain chat model over a Hugging Face VLM with Q-Zoom heads, with its KV cache continued.

Every conversation gets a `ChatSession` (keyed by its first user turn), so the calls of one agent loop extend
one cache: the turn after a tool call prefills only the call's closing tokens and the tool turn. The session's
first prefill is the Q-Zoom perception the zoom tool reads (`tools.langchain_tools.zoom_tool`).

>>> from qzoom_agent.agent import ChatQZoom  # doctest: +SKIP
>>> chat = ChatQZoom.from_pretrained("zoomworld-tiny-tool")  # doctest: +SKIP
>>> chat.bind_tools([zoom_tool(chat)]).invoke([HumanMessage([image_block, {"type": "text", "text": q}])])
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from ..chat import ChatSession, ChatTurn
from ..engine import Sampling
from ..model import QZoomModel
from .messages import parse_tool_calls, to_chat

TOOL_STOP = "</tool_call>"  # a call ends the turn: the tool's result comes next


class ChatQZoom(BaseChatModel):
    """A LangChain chat model over a `QZoomModel` (any supported family, with or without a tool-calling policy).

    Attributes:
        model: the loaded model.
        max_new_tokens: decoding budget per call.
        temperature: 0 decodes greedily; above 0 samples (with ``top_p`` and ``seed``).
        top_p: nucleus sampling mass.
        seed: seed of the sampler, for reproducible draws.
        system: a system prompt prepended when the messages have none; default: the policy's, if any.
        list_tools: render bound tools' schemas in the system turn; default: what the policy was trained with
            (True for models without a policy: general instruction models expect the listing).
        budget: (min, max) visual tokens of images in user turns; the model config's by default.
        max_sessions: conversations whose caches are kept (least recently used dropped first).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: QZoomModel
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    system: str | None = None
    list_tools: bool | None = None
    budget: tuple[int, int] | None = None
    max_sessions: int = Field(8, ge=1)
    _sessions: OrderedDict = PrivateAttr(default_factory=OrderedDict)
    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)

    @classmethod
    def from_pretrained(cls, base: str = "zoomworld-tiny-tool", **kwargs: Any) -> ChatQZoom:
        """Load a model (a policy name or path, a base model, a released checkpoint) and wrap it.

        Args:
            base: as `QZoomModel.from_pretrained`'s ``base``; the bundled tool-calling policy by default.
            **kwargs: fields of this class; the rest go to `QZoomModel.from_pretrained`.
        """
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
        return cls(model=QZoomModel.from_pretrained(base, **kwargs), **own)

    @property
    def _llm_type(self) -> str:
        return "qzoom"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"family": self.model.adapter.family, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature}

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        """Bind tools (LangChain tools, functions or schemas); the policy calls them as ``<tool_call>`` JSON."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    # ---- sessions ----------------------------------------------------------------------------------------------
    def session_for(self, messages: list[BaseMessage] | list[dict]) -> ChatSession:
        """The session of the conversation ``messages`` belongs to (same first user turn), made when new."""
        chat = to_chat(messages) if messages and isinstance(messages[0], BaseMessage) else list(messages)
        key = _first_turn_key(chat)
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
            session = ChatSession(self.model, budget=self.budget)
            self._sessions[key] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def _system(self) -> str | None:
        if self.system is not None:
            return self.system
        return self.model.policy.system if self.model.policy is not None else None

    def _listing(self, tools: list[dict] | None) -> list[dict] | None:
        listed = self.list_tools
        if listed is None:
            listed = self.model.policy.list_tools if self.model.policy is not None else True
        return tools if (tools and listed) else None

    def _prepare(self, messages: list[BaseMessage], tools: list[dict] | None) -> list[dict]:
        chat = to_chat(messages)
        system = self._system()
        if system and not (chat and chat[0]["role"] == "system"):
            chat.insert(0, {"role": "system", "content": system})
        return chat

    def _turn(self, messages: list[BaseMessage], stop: list[str] | None, tools: list[dict] | None,
              on_token=None) -> tuple[ChatTurn, ChatSession]:
        chat = self._prepare(messages, tools)
        stops = tuple(stop or ()) + ((TOOL_STOP,) if tools else ())
        sampling = Sampling(self.temperature, self.top_p, self.seed) if self.temperature > 0 else None
        with self._lock:  # one model, one forward at a time
            session = self.session_for(chat)
            turn = session.generate(chat, tools=self._listing(tools), max_new_tokens=self.max_new_tokens,
                                    stop_strings=stops, sampling=sampling, on_token=on_token)
        return turn, session

    # ---- LangChain interface -----------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        turn, session = self._turn(messages, stop, kwargs.get("tools"))
        return ChatResult(generations=[ChatGeneration(message=self._message(turn, session))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """Text as it is decoded, then one last chunk with the parsed tool calls and the usage."""
        tokens: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["turn"] = self._turn(messages, stop, kwargs.get("tools"), on_token=tokens.put)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
                result["error"] = err
            finally:
                tokens.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        tok = self.model.adapter.tokenizer
        ids: list[int] = []
        shown = ""
        while (token := tokens.get()) is not None:
            ids.append(token)
            text = tok.decode(ids, skip_special_tokens=True)
            if "<tool_call>" in text:  # calls arrive parsed in the last chunk, not as text
                continue
            delta, shown = text[len(shown):], text
            if delta:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        thread.join()
        if "error" in result:
            raise result["error"]
        turn, session = result["turn"]
        final = self._message(turn, session)
        rest = final.content[len(shown):] if final.content.startswith(shown) else ""
        yield ChatGenerationChunk(message=AIMessageChunk(
            content=rest, tool_call_chunks=[{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"],
                                             "index": i, "type": "tool_call_chunk"}
                                            for i, c in enumerate(final.tool_calls)],
            invalid_tool_calls=final.invalid_tool_calls, usage_metadata=final.usage_metadata,
            response_metadata=final.response_metadata))

    def _message(self, turn: ChatTurn, session: ChatSession) -> AIMessage:
        content, calls, invalid = parse_tool_calls(turn.text)
        s = turn.stats
        perception = session._perception
        meta = {
            "finish_reason": {"stop_id": "stop", "stop_string": "stop", "length": "length"}[turn.reason],
            "model_name": self.model.adapter.family,
            "qzoom": {**s.to_json(), "perception": session.perception_source,
                      "gate_score": perception.gate_score if perception is not None else None},
        }
        usage = {"input_tokens": s.prompt_tokens, "output_tokens": s.generated_tokens,
                 "total_tokens": s.prompt_tokens + s.generated_tokens,
                 "input_token_details": {"cache_read": s.kv_reused}}
        return AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid, usage_metadata=usage,
                         response_metadata=meta)


def _first_turn_key(chat: list[dict]) -> str:
    """A fingerprint of the first user turn (its text and images): the identity of a conversation."""
    h = hashlib.blake2b(digest_size=16)
    for m in chat:
        if m.get("role") == "system":
            h.update(str(m.get("content")).encode())
            continue
        if m.get("role") != "user":
            continue
        content = m.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            value = part.get("image", part.get("text", "")) if isinstance(part, dict) else part
            h.update(value.tobytes() if hasattr(value, "tobytes") else str(value).encode())
        break
    return h.hexdigest()
