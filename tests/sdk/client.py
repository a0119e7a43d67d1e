"""Drives Envoy with the official `openai` and `anthropic` Python SDKs, as users do.

One scenario per run; prints one JSON object with what the client saw. The end-to-end tests
(`tests/tests/e2e_sdk.rs`) run it against real Envoy, the WASM filter, the sidecar and the
mock upstream, and check the sidecar's counters against what the client saw.

    python client.py --base-url http://127.0.0.1:PORT --token JWT [--team ops] SCENARIO [ARGS]
"""

import argparse
import asyncio
import json
import random
import sys

import anthropic
import openai

PROMPT = "Summarise the quarterly report in three bullet points"


def extra_headers(args):
    """The `--header 'name: value'` options, as a dict."""
    out = {}
    for h in args.header:
        name, _, value = h.partition(":")
        out[name.strip()] = value.strip()
    return out


def openai_client(args, **kw):
    # The platform's JWT is the "API key": the SDK sends it as `Authorization: Bearer`.
    return openai.OpenAI(
        base_url=args.base_url + "/v1",
        api_key=args.token,
        default_headers={"x-team-id": args.team, **extra_headers(args), **kw.pop("headers", {})},
        **kw,
    )


def anthropic_client(args, **kw):
    # `auth_token` sends `Authorization: Bearer`; `--anthropic-api-key` passes the JWT as the
    # SDK's `api_key` instead (`x-api-key`), as most Anthropic code is written.
    key = {"api_key": args.token} if args.anthropic_api_key else {"auth_token": args.token}
    return anthropic.Anthropic(
        base_url=args.base_url,
        **key,
        default_headers={"x-team-id": args.team, **extra_headers(args), **kw.pop("headers", {})},
        **kw,
    )


def usage_dict(u):
    return None if u is None else u.model_dump()


def chat_json(args):
    r = openai_client(args).chat.completions.create(
        model="gpt-4o-mini", max_tokens=args.max_tokens,
        messages=[{"role": "user", "content": PROMPT}])
    return {"text": r.choices[0].message.content, "usage": usage_dict(r.usage)}


def chat_stream(args, include_usage=True, headers=None, leave_at=None):
    """A streamed chat. `leave_at`: 'finish' closes the stream at the chunk with a
    finish_reason (before any usage); by default the SDK reads to `[DONE]` and closes."""
    kw = {}
    if include_usage:
        kw["stream_options"] = {"include_usage": True}
    client = openai_client(args, headers=headers or {})
    stream = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=args.max_tokens, stream=True,
        messages=[{"role": "user", "content": PROMPT}], **kw)
    text, usage, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = usage_dict(chunk.usage)
        for c in chunk.choices:
            text += c.delta.content or ""
            if leave_at == "finish" and c.finish_reason is not None:
                stream.close()
                return {"text": text, "usage": usage, "chunks": chunks, "left": True}
    return {"text": text, "usage": usage, "chunks": chunks}


def responses_json(args):
    r = openai_client(args).responses.create(
        model="gpt-4o-mini", input=PROMPT, max_output_tokens=args.max_tokens)
    return {"text": r.output_text, "usage": usage_dict(r.usage)}


def responses_stream(args):
    stream = openai_client(args).responses.create(
        model="gpt-4o-mini", input=PROMPT, max_output_tokens=args.max_tokens, stream=True)
    text, usage = "", None
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            usage = usage_dict(event.response.usage)
    return {"text": text, "usage": usage}


def messages_json(args, headers=None):
    r = anthropic_client(args, headers=headers or {}).messages.create(
        model="claude-sonnet-4", max_tokens=args.max_tokens,
        messages=[{"role": "user", "content": PROMPT}])
    return {"text": r.content[0].text, "usage": usage_dict(r.usage)}


def messages_stream(args, headers=None):
    client = anthropic_client(args, headers=headers or {})
    with client.messages.stream(
            model="claude-sonnet-4", max_tokens=args.max_tokens,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {"text": text, "usage": usage_dict(final.usage)}


def messages_stream_leave_early(args):
    """`client.messages.stream`, read `--leave-after` text deltas, then close: before the
    stream's `message_delta` (the mock paces its events with `x-mock-pace-ms`)."""
    client = anthropic_client(args)
    read = 0
    with client.messages.stream(
            model="claude-sonnet-4", max_tokens=args.max_tokens,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        for _ in stream.text_stream:
            read += 1
            if read >= args.leave_after:
                break
    return {"read": read}


def chat_echo(args):
    """A chat call: its status, its usage, and the request headers the upstream echoed."""
    raw = openai_client(args).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=args.max_tokens,
        messages=[{"role": "user", "content": PROMPT}])
    echo = {k[len("x-echo-"):]: v for k, v in raw.headers.items() if k.startswith("x-echo-")}
    return {"status": raw.status_code, "usage": usage_dict(raw.parse().usage), "echo": echo}


def embeddings(args):
    r = openai_client(args).embeddings.create(model="text-embedding-3-small", input=PROMPT)
    return {"vectors": len(r.data), "dims": len(r.data[0].embedding), "usage": usage_dict(r.usage)}


def free_calls(args):
    """The calls that cost no tokens: models (both SDKs), moderation, Anthropic's token count."""
    o, a = openai_client(args), anthropic_client(args)
    return {
        "openai_models": [m.id for m in o.models.list()],
        "anthropic_models": [m.id for m in a.models.list()],
        "flagged": o.moderations.create(input=PROMPT).results[0].flagged,
        "counted": a.messages.count_tokens(
            model="claude-sonnet-4",
            messages=[{"role": "user", "content": PROMPT}]).input_tokens,
    }


def openai_batch(args):
    """Upload a batch's input (multipart), create the batch, read its output file
    `--reads` times: what each step saw."""
    client = openai_client(args)
    line = json.dumps({"custom_id": "r-0", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini",
                                "messages": [{"role": "user", "content": PROMPT}]}})
    f = client.files.create(file=("input.jsonl", (line + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = client.batches.retrieve(batch.id)
    answers = []
    for _ in range(args.reads):
        text = client.files.content(batch.output_file_id).text
        answers.append(sum(1 for l in text.splitlines()
                           if json.loads(l)["response"]["status_code"] == 200))
    return {"uploaded": f.bytes, "status": batch.status, "answers": answers}


def anthropic_batch(args):
    """Create a message batch and read its results `--reads` times."""
    client = anthropic_client(args)
    batch = client.messages.batches.create(requests=[
        {"custom_id": f"r-{i}", "params": {"model": "claude-sonnet-4", "max_tokens": 20,
                                          "messages": [{"role": "user", "content": PROMPT}]}}
        for i in range(3)])
    succeeded = []
    for _ in range(args.reads):
        succeeded.append(sum(1 for r in client.messages.batches.results(batch.id)
                             if r.result.type == "succeeded"))
    return {"status": batch.processing_status, "succeeded": succeeded}


def unknown_endpoint(args):
    """An endpoint the presets do not meter (image generation)."""
    try:
        openai_client(args).images.generate(model="gpt-image-1", prompt=PROMPT)
    except openai.APIStatusError as e:
        return {"status": e.status_code, "message": str(e), "type": e.body.get("type"),
                "should_retry": e.response.headers.get("x-should-retry")}
    return {"status": 200}


def denied(args):
    """A request the SDK is refused: what `str(exception)` says, and the status."""
    try:
        if args.api == "anthropic":
            anthropic_client(args).messages.create(
                model="claude-sonnet-4", max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": PROMPT}])
        else:
            openai_client(args).chat.completions.create(
                model="gpt-4o-mini", max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": PROMPT}])
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        # OpenAI's SDK keeps the body's `error` object, Anthropic's the whole body.
        body = e.body if isinstance(e.body, dict) else {}
        err = body["error"] if isinstance(body.get("error"), dict) else body
        return {"status": e.status_code, "message": str(e), "type": err.get("type"),
                "should_retry": e.response.headers.get("x-should-retry")}
    return {"status": 200}


def sequence(args):
    """`--requests` chat calls one after another, non-streamed and streamed in turn, as an
    application keeps calling through an outage: each one's status (after the SDK's own
    retries), the upstream's echo of the `x-tollgate-unchecked` mark, and the usage the
    answer reported."""
    client = openai_client(args)
    out = []
    for i in range(args.requests):
        streamed = i % 2 == 1
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": PROMPT}],
                **({"stream": True, "stream_options": {"include_usage": True}} if streamed else {}))
            usage = None
            if streamed:
                for chunk in raw.parse():
                    if chunk.usage is not None:
                        usage = chunk.usage.total_tokens
            else:
                usage = raw.parse().usage.total_tokens
            out.append({"streamed": streamed, "status": raw.status_code, "usage": usage,
                        "unchecked": raw.headers.get("x-echo-x-tollgate-unchecked")})
        except openai.APIStatusError as e:
            out.append({"streamed": streamed, "status": e.status_code, "usage": None,
                        "unchecked": None, "body": e.body})
    return out


async def race(args):
    """Many SDK clients at once against one cap, random sizes and prompt lengths, each
    streamed or not: what was granted, by the usage each answer reported."""
    client = openai.AsyncOpenAI(base_url=args.base_url + "/v1", api_key=args.token,
                                default_headers={"x-team-id": args.team}, max_retries=0)
    anthropic_async = anthropic.AsyncAnthropic(
        base_url=args.base_url, auth_token=args.token,
        default_headers={"x-team-id": args.team}, max_retries=0)
    rng = random.Random(args.seed)
    granted, denied_n, errors = 0, 0, []

    async def agent(i):
        nonlocal granted, denied_n
        local = random.Random(rng.random())
        for _ in range(args.requests):
            n_words = local.randint(1, 60)
            words = " ".join(["word"] * n_words)
            budget = local.randint(1, 40)
            # What the mock upstream uses: the prompt's words plus the budget capped at 24. A
            # stream that did not ask for usage never shows it to the client (the filter asks
            # for it and hides it), so the client counts from this.
            true_usage = n_words + min(budget, 24)
            try:
                kind = local.random()
                if args.mixed and kind >= 0.5:
                    # Half the calls go elsewhere: embeddings (the input's words), a free model
                    # listing, and Anthropic messages (streamed or not).
                    if kind < 0.65:
                        r = await client.embeddings.create(
                            model="text-embedding-3-small", input=words)
                        assert r.usage.total_tokens == n_words, r.usage
                        granted += n_words
                    elif kind < 0.75:
                        await client.models.list()
                    elif kind < 0.875:
                        m = await anthropic_async.messages.create(
                            model="claude-sonnet-4", max_tokens=budget,
                            messages=[{"role": "user", "content": words}])
                        assert m.usage.output_tokens == min(budget, 24), m.usage
                        granted += true_usage
                    else:
                        async with anthropic_async.messages.stream(
                                model="claude-sonnet-4", max_tokens=budget,
                                messages=[{"role": "user", "content": words}]) as st:
                            async for _ in st.text_stream:
                                pass
                            final = await st.get_final_message()
                        assert final.usage.output_tokens == min(budget, 24), final.usage
                        granted += true_usage
                    continue
                if kind < 0.4:
                    r = await client.chat.completions.create(
                        model="gpt-4o-mini", max_tokens=budget,
                        messages=[{"role": "user", "content": words}])
                    assert r.usage.total_tokens == true_usage, r.usage
                else:
                    options = {"include_usage": True} if kind < 0.7 else None
                    stream = await client.chat.completions.create(
                        model="gpt-4o-mini", max_tokens=budget, stream=True,
                        messages=[{"role": "user", "content": words}],
                        **({"stream_options": options} if options else {}))
                    async for chunk in stream:
                        if chunk.usage is not None:
                            assert chunk.usage.total_tokens == true_usage, chunk.usage
                granted += true_usage
            except (openai.RateLimitError, anthropic.RateLimitError):
                denied_n += 1
            except (openai.APIStatusError, anthropic.APIStatusError) as e:  # pragma: no cover
                errors.append(f"{e.status_code}: {e}")

    await asyncio.gather(*(agent(i) for i in range(args.agents)))
    await client.close()
    await anthropic_async.close()
    return {"granted": granted, "denied": denied_n, "errors": errors}


def cut(run):
    """Runs a streamed scenario that a refused slice may end: what arrived before the end,
    and the error the SDK raised (its class and message), if any."""
    got = {"text": ""}
    try:
        got.update(run(got))
    except (openai.APIError, anthropic.APIError) as e:
        got["error"] = {"class": type(e).__name__, "message": str(e)}
    return got


def chat_stream_cut(args):
    def run(got):
        stream = openai_client(args).chat.completions.create(
            model="gpt-4o-mini", max_tokens=args.max_tokens, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": PROMPT}])
        usage = None
        for chunk in stream:
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            for c in chunk.choices:
                got["text"] += c.delta.content or ""
        return {"usage": usage}
    return cut(run)


def responses_stream_cut(args):
    def run(got):
        stream = openai_client(args).responses.create(
            model="gpt-4o-mini", input=PROMPT, max_output_tokens=args.max_tokens, stream=True)
        usage = None
        for event in stream:
            if event.type == "response.output_text.delta":
                got["text"] += event.delta
            elif event.type == "response.completed":
                usage = usage_dict(event.response.usage)
        return {"usage": usage}
    return cut(run)


def messages_stream_cut(args):
    def run(got):
        client = anthropic_client(args)
        with client.messages.stream(
                model="claude-sonnet-4", max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": PROMPT}]) as stream:
            for text in stream.text_stream:
                got["text"] += text
            final = stream.get_final_message()
        return {"usage": usage_dict(final.usage)}
    return cut(run)


SCENARIOS = {
    "chat-stream-cut": chat_stream_cut,
    "responses-stream-cut": responses_stream_cut,
    "messages-stream-cut": messages_stream_cut,
    "chat-json": chat_json,
    "chat-stream": lambda a: chat_stream(a),
    "chat-stream-no-usage": lambda a: chat_stream(a, include_usage=False),
    "chat-stream-leave-at-done": lambda a: chat_stream(
        a, headers={"x-mock-linger-ms": "800"}),
    "chat-stream-leave-at-finish": lambda a: chat_stream(
        a, include_usage=False, leave_at="finish"),
    "responses-json": responses_json,
    "responses-stream": responses_stream,
    "messages-json": messages_json,
    "messages-stream": messages_stream,
    "messages-cache": lambda a: messages_json(a, headers={"x-mock-cache": "100,50"}),
    "messages-stream-leave-early": messages_stream_leave_early,
    "chat-echo": chat_echo,
    "embeddings": embeddings,
    "free-calls": free_calls,
    "openai-batch": openai_batch,
    "anthropic-batch": anthropic_batch,
    "unknown-endpoint": unknown_endpoint,
    "denied": denied,
    "sequence": sequence,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--team", default="ops")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--api", default="openai")
    p.add_argument("--agents", type=int, default=24)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--leave-after", type=int, default=10)
    p.add_argument("--reads", type=int, default=1)
    p.add_argument("--mixed", action="store_true",
                   help="race: embeddings, free calls and Anthropic messages among the chats")
    p.add_argument("--anthropic-api-key", action="store_true",
                   help="give the token to the Anthropic SDK as `api_key`, not `auth_token`")
    p.add_argument("--header", action="append", default=[],
                   help="an extra request header, 'name: value' (repeatable)")
    p.add_argument("scenario", choices=sorted([*SCENARIOS, "race"]))
    args = p.parse_args()
    if args.scenario == "race":
        out = asyncio.run(race(args))
    else:
        out = SCENARIOS[args.scenario](args)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
