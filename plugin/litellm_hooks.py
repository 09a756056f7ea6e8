"""The only module that imports litellm: glue between LiteLLM's proxy and meterline.

Registered in litellm_config.yaml as
    litellm_settings.callbacks: plugin.litellm_hooks.meterline_logger
    general_settings.custom_auth: plugin.litellm_hooks.custom_auth

Flow of one request: custom_auth resolves the customer -> async_pre_call_hook gives the request
a ledger id and its labels -> LiteLLM calls the provider (retries, fallbacks, cache) ->
async_post_call_success_hook (or, for streams, the iterator hook before the last chunk) prices
the final usage and commits the ledger + outbox rows before the client gets the response.
LiteLLM may load this file once per reference in the config, so state lives in plugin.runtime.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime

import litellm
from fastapi import Request
from litellm.integrations.custom_logger import CustomLogger
from litellm.litellm_core_utils.core_helpers import (
    get_metadata_variable_name_from_kwargs,
)
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

from plugin import admission, metrics, runtime
from plugin.api import PREFIX, router
from plugin.rules.identity import (
    CUSTOMER_HEADER,
    METADATA_KEY,
    AuthFailure,
    Template,
    UnknownKey,
    customer_from_metadata,
    identify,
    is_master_key,
    request_labels,
)
from plugin.rules.metering import FinishedCall, bill, prompt_token_bound
from plugin.rules.pricing import Usage
from plugin.rules.slices import Hold
from plugin.rules.streams import StreamTally, as_mapping, response_text, response_usage
from plugin.tasks import in_background

log = logging.getLogger("meterline")

MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""Where clients put their output limit: chat (old and new name) and the Responses API."""
OUTPUT_LIMIT_KEY = {"acompletion": "max_tokens", "completion": "max_tokens", "atext_completion": "max_tokens",
                    "text_completion": "max_tokens", "aresponses": "max_output_tokens",
                    "responses": "max_output_tokens"}
"""The key a lowered limit is written to when the request set none, by LiteLLM call type; a call type not
here produces no output tokens (embeddings, moderation, ...) and is never given one."""

STATE_KEY = "meterline"
"""Per-request state, kept in LiteLLM's own metadata field (which LiteLLM never sends upstream)."""


def _meterline() -> runtime.Meterline:
    return runtime.current(model_cost=litellm.model_cost)


def _refuse(reason: str, message: str, status: int, retry_after: float | None = None) -> ProxyException:
    """An OpenAI-shaped error: LiteLLM puts the status in error.code, our reason in error.type."""
    headers = {"x-meterline-error": reason}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, round(retry_after)))
    return ProxyException(message=message, type=reason, param=None, code=status, headers=headers)


def _new_ledger_id() -> str:
    """Time-ordered and unguessable; never taken from the client, so it cannot be replayed."""
    return f"mtr_{time.time_ns():016x}{secrets.token_hex(8)}"


def _hidden_params(value: object) -> dict:
    """LiteLLM's `_hidden_params`: a dict on most objects, a pydantic HiddenParams on text completions."""
    return dict(as_mapping(getattr(value, "_hidden_params", None)) or {})


# ------------------------------------------------------------------------------ auth


async def custom_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """LiteLLM custom_auth: a meterline key, or the master key (+ X-Meterline-Customer)."""
    from litellm.proxy import proxy_server

    meterline = _meterline()
    directory = meterline.directory
    headers = dict(request.headers)
    master_key = proxy_server.master_key or meterline.settings.master_key
    named = headers.get(CUSTOMER_HEADER)
    arguments = (
        api_key, headers, master_key, directory.customer_for_secret, directory.customer_exists,
        meterline.config.defer_unknown_keys_to_litellm,
    )
    from_memory = directory.knows_key(api_key) or (
        is_master_key(api_key, master_key) and (named is None or directory.knows_customer(named))
    )
    try:
        with metrics.AUTH_SECONDS.time():
            # Most requests resolve from memory; only a miss goes to the database, off the event loop.
            identity = identify(*arguments) if from_memory else await asyncio.to_thread(identify, *arguments)
    except AuthFailure as failure:
        raise _refuse(failure.reason, failure.message, failure.status) from None
    except UnknownKey:
        raise PermissionError("not a meterline key") from None  # custom_auth_settings.mode=auto: LiteLLM decides
    if identity.operator:
        return UserAPIKeyAuth(
            api_key="meterline-operator", user_id="meterline-operator", user_role=LitellmUserRoles.PROXY_ADMIN,
            metadata={METADATA_KEY: identity.customer_id} if identity.customer_id else {},
        )
    return _customer_auth(identity.customer_id)


@functools.lru_cache(maxsize=4096)
def _customer_auth_template(customer_id: str) -> Template[UserAPIKeyAuth]:
    return Template(UserAPIKeyAuth(api_key=f"meterline-customer:{customer_id}", user_id=customer_id,
                                   metadata={METADATA_KEY: customer_id}))


def _customer_auth(customer_id: str) -> UserAPIKeyAuth:
    """The customer's UserAPIKeyAuth, validated once per customer and copied per request."""
    return _customer_auth_template(customer_id).copy()


# ------------------------------------------------------------------------------ metering


class MeterlineLogger(CustomLogger):
    """Bills the final successful response of every request; nothing else."""

    async def async_pre_call_hook(self, user_api_key_dict: UserAPIKeyAuth, cache, data: dict, call_type):
        customer = customer_from_metadata(user_api_key_dict.metadata, user_api_key_dict.team_metadata)
        meterline = _meterline()
        if customer is None:
            if not meterline.config.allow_anonymous:
                raise _refuse(
                    "customer_required",
                    "This request names no customer to bill. Use a customer key, or send "
                    "X-Meterline-Customer with the master key.",
                    401,
                )
            customer = meterline.config.anonymous_customer
        server_request = data.get("proxy_server_request") or {}
        body = server_request.get("body") if isinstance(server_request.get("body"), Mapping) else data
        headers = server_request.get("headers") if isinstance(server_request.get("headers"), Mapping) else {}
        member, action = request_labels(body, headers)
        metadata = data.get(_metadata_field(data))
        if not isinstance(metadata, dict):
            metadata = data[_metadata_field(data)] = {}
        state = metadata[STATE_KEY] = {
            "seal": runtime.PROCESS_SEAL, "ledger_id": _new_ledger_id(), "customer": customer,
            "member": member, "action": action,
        }
        with metrics.ADMISSION_SECONDS.time():
            await _reserve(meterline, data, state, call_type)
        return data

    async def async_post_call_failure_hook(self, request_data: dict, original_exception, user_api_key_dict,
                                           traceback_str=None):
        """The request failed for good (after retries and fallbacks): free its reservation."""
        state = _state(request_data)
        if state is not None and state.get("admitted", {}).get("hold"):
            await _release(_meterline(), state)
        return None

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: UserAPIKeyAuth, response):
        state = _state(data)
        if state is None or "credits_ucr" in state:
            return response
        with metrics.BILLING_SECONDS.time():
            usage = response_usage(response)
            source = "provider"
            if usage is None:
                usage, source = _counted_usage(data, response_text(response)), "litellm"
            await _settle(data, state, usage, source, _hidden_params(response), stream=False)
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response, request_data: dict
    ) -> AsyncGenerator:
        state = _state(request_data)
        if state is None:
            async for chunk in response:
                yield chunk
            return
        tally = StreamTally()
        # The stream wrapper knows what its chunks do not (cache_hit on a replayed stream).
        wrapper_hidden = _hidden_params(response)
        delivered: list[str] = []
        held, held_text = None, ""
        try:
            async for chunk in response:
                text = tally.observe(chunk)
                if held is not None:
                    yield held
                    delivered.append(held_text)
                held, held_text = chunk, text
        except BaseException:
            # The client went away, or the provider failed, mid-stream: bill what was delivered
            # (policy "delivered"); a stream that delivered nothing was a failed attempt.
            if delivered:
                usage = _counted_usage(request_data, "".join(delivered))
                hidden = {**_hidden_params(held), **wrapper_hidden}
                in_background(_settle(request_data, state, usage, "delivered", hidden, stream=True), "billing")
            elif state.get("admitted", {}).get("hold"):
                in_background(_release(_meterline(), state), "releasing a reservation")
            raise
        # The stream is complete: bill it before the client receives the last chunk.
        with metrics.BILLING_SECONDS.time():
            usage = tally.usage()
            source = "provider"
            if usage is None:
                usage, source = _counted_usage(request_data, "".join(delivered) + held_text), "litellm"
            # Hidden params are read from the last chunk only, not copied on every chunk.
            hidden = {**_hidden_params(held), **wrapper_hidden}
            await _settle(request_data, state, usage, source, hidden, stream=True, chunks=tally.chunks)
        if held is not None:
            yield held

    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict, response, *args, **kwargs):
        state = _state(data)
        if state is None or "credits_ucr" not in state:
            return None
        headers = {"x-meterline-credits": str(state["credits_ucr"])}
        remaining = state.get("remaining", "unlimited")
        if remaining is not None:
            headers["x-meterline-remaining"] = str(remaining)
        return headers


def _metadata_field(data: Mapping[str, object]) -> str:
    """LiteLLM's own metadata field: `litellm_metadata` on routes where `metadata` is the provider's."""
    return get_metadata_variable_name_from_kwargs(data)


def _state(data: Mapping[str, object]) -> dict | None:
    metadata = data.get(_metadata_field(data))
    state = metadata.get(STATE_KEY) if isinstance(metadata, Mapping) else None
    if isinstance(state, dict) and state.get("seal") == runtime.PROCESS_SEAL:
        return state
    return None


async def _settle(
    data: Mapping, state: dict, usage: Usage, source: str, hidden: Mapping, stream: bool, chunks: int = 0
) -> None:
    """Price the call and commit its ledger + outbox rows; refuse to answer if that fails."""
    meterline = _meterline()
    call = FinishedCall(
        ledger_id=state["ledger_id"],
        customer_id=state["customer"],
        member=state["member"],
        action=state["action"],
        model=_served_model_group(data, hidden),
        deployment_model=_deployment_model(hidden),
        provider=str(hidden.get("custom_llm_provider") or "-"),
        usage=usage,
        finished_at=datetime.now(UTC),
        cache_hit=bool(hidden.get("cache_hit")),
        stream=stream,
        usage_source=source,
        chunks=chunks,
    )
    record = bill(call, meterline.price_book)
    admitted = _admitted(state) if "admitted" in state else None
    try:
        if admitted is None:
            written, billed = await meterline.writer.write(record), None
        else:
            billed = await admission.record_bill(meterline, admitted, record)
            written = billed.record
    except Exception as exc:
        log.error("meterline: could not record ledger row %s: %s", call.ledger_id, exc.__class__.__name__)
        if admitted is not None and admitted.hold is not None:
            in_background(_release(meterline, state), "releasing a reservation")
        raise _refuse(
            "billing_unavailable",
            "The request could not be recorded for billing, so its answer was withheld. Try again shortly.",
            503,
        ) from None
    if billed is not None:
        state["admitted"]["hold"] = None
        if admitted.cap_ucr is not None:  # None when unknown (counters down): no header rather than a wrong one
            state["remaining"] = billed.remaining_ucr
        in_background(billed.after, "the checks after a bill")
    state["credits_ucr"] = written.entry.credits_ucr


# ------------------------------------------------------------------------------ limits


async def _reserve(meterline: runtime.Meterline, data: dict, state: dict, call_type: str) -> None:
    """Admit the request (plugin.admission): refuse it, or let it through, its max_tokens lowered
    to its plan's output ceiling or to what the customer can still afford."""
    asked = next((data[key] for key in MAX_TOKENS_KEYS if isinstance(data.get(key), int) and data[key] > 0), None)
    try:
        admitted = await admission.admit(
            meterline, state["customer"], state["ledger_id"], model=str(data.get("model") or ""),
            asked_max_tokens=asked, prompt_tokens=lambda: _counted_usage(data, "").prompt_tokens,
            prompt_token_bound=lambda: prompt_token_bound(data.get("messages")),
        )
    except admission.Refused as refused:
        raise _refuse(refused.reason, refused.message, refused.status, refused.retry_after) from None
    if admitted.max_tokens is not None:
        absent = [OUTPUT_LIMIT_KEY[call_type]] if call_type in OUTPUT_LIMIT_KEY else []
        for key in [key for key in MAX_TOKENS_KEYS if key in data] or absent:
            data[key] = admitted.max_tokens
    hold = admitted.hold
    state["admitted"] = {"period": admitted.period_start.isoformat(), "cap": admitted.cap_ucr,
                         "hold": None if hold is None else [hold.reservation_id, hold.ucr, hold.shared],
                         "metered": admitted.metered}


def _admitted(state: dict) -> admission.Admitted:
    """The admission as saved in the request's metadata (plain values: LiteLLM may copy it)."""
    saved = state["admitted"]
    hold = None if not saved["hold"] else Hold(*saved["hold"])
    return admission.Admitted(state["customer"], datetime.fromisoformat(saved["period"]), saved["cap"],
                              hold, metered=saved["metered"])


async def _release(meterline: runtime.Meterline, state: dict) -> None:
    admitted = _admitted(state)
    state["admitted"]["hold"] = None
    await admission.release(meterline, admitted, state["ledger_id"])


def _served_model_group(data: Mapping, hidden: Mapping) -> str:
    """The model group that answered: after a fallback it is not the one the client asked for."""
    headers = hidden.get("additional_headers")
    served = headers.get("x-litellm-model-group") if isinstance(headers, Mapping) else None
    return str(served or data.get("model") or "-")


def _deployment_model(hidden: Mapping) -> str | None:
    """The provider-side model name (e.g. "openai/gpt-4o"), for LiteLLM's price table."""
    name = hidden.get("litellm_model_name") or hidden.get("model")
    return str(name) if name else None


def _counted_usage(data: Mapping, completion_text: str) -> Usage:
    """LiteLLM's own token count, for providers that send no usage. Never 0 when text flowed."""
    model = str(data.get("model") or "")
    messages = data.get("messages")
    if messages is None:
        # Responses API `input`, or a text completion's `prompt`: a string, a list of strings or of messages
        raw = data.get("input", data.get("prompt"))
        items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        messages = [item if isinstance(item, Mapping) else {"role": "user", "content": str(item)} for item in items]
    prompt = litellm.token_counter(model=model, messages=messages) if isinstance(messages, list) and messages else 0
    completion = litellm.token_counter(model=model, text=completion_text) if completion_text else 0
    return Usage(prompt_tokens=int(prompt), completion_tokens=int(completion))


# ------------------------------------------------------------------------------ start-up


def _mount_api() -> None:
    """Mount meterline's routes on the proxy app, ahead of LiteLLM's own (once per process)."""
    from litellm.proxy.proxy_server import app

    if getattr(app.state, "meterline_mounted", False):
        return
    before = len(app.router.routes)
    app.include_router(router)
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours
    app.state.meterline_mounted = True
    log.info("meterline: API mounted under %s", PREFIX)


_meterline().start()
_meterline().prompt_token_counter = lambda model, messages: litellm.token_counter(model=model, messages=messages)
_mount_api()

meterline_logger = MeterlineLogger()
