#!/usr/bin/env python3
"""A kvserve client in Python (grpcio) that needs no .proto file.

The message types come from the server's reflection service, so this works against any
running `kvserve serve`:

    pip install grpcio grpcio-reflection protobuf
    python3 scripts/grpc_client.py --addr 127.0.0.1:50051 --prompt "The capital of France is"
    python3 scripts/grpc_client.py --stream --chat --prompt "Write a haiku about caches"

`--check` runs the checks the end-to-end tests use (tests/tests/grpc_server.rs runs it):
Generate, GenerateStream, Tokenize, health, an INVALID_ARGUMENT and DEADLINE_EXCEEDED for a
unary call and a stream. It prints "python client: all checks passed" and exits 0, or fails
with a message.
"""

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "kvserve.v1.Generation"


class Kvserve:
    """Stubs for kvserve.v1.Generation built from the server's reflection."""

    def __init__(self, channel):
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.pool.FindServiceByName(SERVICE)  # Fails early if the server does not serve it.
        self.finish_reason = self.pool.FindEnumTypeByName("kvserve.v1.FinishReason")
        self.GenerateRequest = self.message("GenerateRequest")
        self.ChatMessage = self.message("ChatMessage")
        self.SamplingParams = self.message("SamplingParams")
        self.TokenizeRequest = self.message("TokenizeRequest")

        def method(name, request, response, stream=False):
            factory = channel.unary_stream if stream else channel.unary_unary
            return factory(
                f"/{SERVICE}/{name}",
                request_serializer=self.message(request).SerializeToString,
                response_deserializer=self.message(response).FromString,
            )

        self.generate = method("Generate", "GenerateRequest", "GenerateResponse")
        self.generate_stream = method(
            "GenerateStream", "GenerateRequest", "GenerateStreamResponse", stream=True
        )
        self.tokenize = method("Tokenize", "TokenizeRequest", "TokenizeResponse")
        self.get_model_info = method("GetModelInfo", "GetModelInfoRequest", "ModelInfo")
        self.GetModelInfoRequest = self.message("GetModelInfoRequest")

    def message(self, name):
        descriptor = self.pool.FindMessageTypeByName(f"kvserve.v1.{name}")
        if hasattr(message_factory, "GetMessageClass"):
            return message_factory.GetMessageClass(descriptor)
        return message_factory.MessageFactory(self.pool).GetPrototype(descriptor)

    def reason(self, value):
        return self.finish_reason.values_by_number[value].name


def request(kv, args, **overrides):
    fields = dict(max_tokens=args.max_tokens)
    if args.chat:
        fields["messages"] = [kv.ChatMessage(role="user", content=args.prompt)]
    else:
        fields["text"] = args.prompt
    fields.update(overrides)
    return kv.GenerateRequest(**fields)


def expect_error(code, call, what):
    try:
        result = call()
        # A stream raises while it is read.
        if hasattr(result, "__iter__"):
            for _ in result:
                pass
    except grpc.RpcError as err:
        if err.code() != code:
            fail(f"{what}: expected {code}, got {err.code()}: {err.details()}")
        return err
    fail(f"{what}: expected {code}, got a response")


def fail(message):
    print(f"python client: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(kv, channel, args):
    info = kv.get_model_info(kv.GetModelInfoRequest(), timeout=30)
    print(f"model {info.model} on {info.device}, KV {info.kv_cache_dtype}, "
          f"max_model_len {info.max_model_len}")

    greedy = request(kv, args, max_tokens=8)
    unary = kv.generate(greedy, timeout=120)
    if len(unary.completions) != 1 or not unary.completions[0].text:
        fail(f"Generate: {unary}")
    completion = unary.completions[0]
    if kv.reason(completion.finish_reason) not in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP"):
        fail(f"Generate: finish reason {completion.finish_reason}")
    if unary.usage.completion_tokens != len(completion.token_ids):
        fail(f"Generate: usage {unary.usage}")
    print(f"Generate: {completion.text!r} ({kv.reason(completion.finish_reason)})")

    messages = list(kv.generate_stream(greedy, timeout=120))
    streamed = "".join(m.text for m in messages)
    if streamed != completion.text:
        fail(f"GenerateStream text {streamed!r} != Generate text {completion.text!r}")
    if not messages[-1].HasField("usage"):
        fail("GenerateStream: no usage on the final message")
    print(f"GenerateStream: {len(messages)} messages, same text")

    tokens = kv.tokenize(kv.TokenizeRequest(text=args.prompt), timeout=30).token_ids
    if not args.chat and len(tokens) != unary.usage.prompt_tokens:
        fail(f"Tokenize: {len(tokens)} ids, Generate used {unary.usage.prompt_tokens}")
    print(f"Tokenize: {len(tokens)} ids")

    bad = request(kv, args, sampling=kv.SamplingParams(top_p=0.0))
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: kv.generate(bad, timeout=30),
                       "top_p = 0")
    if "sampling.top_p" not in err.details():
        fail(f"INVALID_ARGUMENT should name sampling.top_p: {err.details()!r}")
    print(f"INVALID_ARGUMENT: {err.details()}")

    long = request(kv, args, max_tokens=400, ignore_eos=True)
    expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: kv.generate(long, timeout=1.0),
                 "Generate past its deadline")
    expect_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                 lambda: kv.generate_stream(long, timeout=1.0),
                 "GenerateStream past its deadline")
    print("DEADLINE_EXCEEDED: unary and stream")

    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        print("health: grpcio-health-checking not installed, not checked")
    else:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            fail(f"health: {status}")
        print("health: SERVING")

    print("python client: all checks passed")


def latency(kv, runs):
    """Median and p90 wall-clock latency of each call, `runs` times, one at a time."""
    import statistics
    import time

    def timed(call):
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1000)
        samples.sort()
        return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]

    def first_message():
        for _ in kv.generate_stream(kv.GenerateRequest(text="The capital of France is",
                                                       max_tokens=32)):
            return

    calls = [
        ("GetModelInfo", lambda: kv.get_model_info(kv.GetModelInfoRequest())),
        ("Tokenize (5 tokens)", lambda: kv.tokenize(kv.TokenizeRequest(text="The capital of France is"))),
        ("Generate, max_tokens 1", lambda: kv.generate(kv.GenerateRequest(
            text="The capital of France is", max_tokens=1))),
        ("Generate, max_tokens 32 (ignore_eos)", lambda: kv.generate(kv.GenerateRequest(
            text="The capital of France is", max_tokens=32, ignore_eos=True))),
        ("GenerateStream, first message", first_message),
    ]
    for name, call in calls:
        median, p90 = timed(call)
        print(f"{name}: median {median:.1f} ms, p90 {p90:.1f} ms ({runs} runs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port of kvserve")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user chat message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--check", action="store_true", help="run the end-to-end checks")
    parser.add_argument("--latency", type=int, metavar="RUNS",
                        help="time each call RUNS times and print median / p90")
    args = parser.parse_args()

    with grpc.insecure_channel(args.addr) as channel:
        kv = Kvserve(channel)
        if args.check:
            check(kv, channel, args)
            return
        if args.latency:
            latency(kv, args.latency)
            return
        sampling = kv.SamplingParams(temperature=args.temperature)
        if args.seed is not None:
            sampling.seed = args.seed
        req = request(kv, args, sampling=sampling)
        if args.stream:
            for message in kv.generate_stream(req):
                print(message.text, end="", flush=True)
                if message.HasField("usage"):
                    print(f"\n[{message.usage.prompt_tokens} prompt + "
                          f"{message.usage.completion_tokens} generated tokens]")
        else:
            response = kv.generate(req)
            for c in response.completions:
                print(c.text)
                print(f"[{kv.reason(c.finish_reason)}; {response.usage.prompt_tokens} prompt + "
                      f"{response.usage.completion_tokens} generated tokens]")


if __name__ == "__main__":
    main()
