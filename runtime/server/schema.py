"""The scalar settings of a request, declared once and validated by pydantic: types (no string-to-number or
bool-to-number coercion; 3.0 counts as the integer 3, as JSON clients send it), ranges, finite numbers.
protocol.fields() turns a validation error into an OpenAI-shaped 400 naming the field. The structural parts of a
request (messages, tools, response_format, stop) are parsed in protocol.py, anthropic.py and tools.py, whose rules
are semantic (which role may omit content, which tool choice needs tools) and whose errors name the exact path."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_TOP_LOGPROBS = 20


def _integral(v: object) -> object:
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
Positive = Annotated[Int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TopLogprobs = Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
# what a range error is called (the rest are type errors)
RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                          "literal_error"})  # fmt: skip


class Fields(BaseModel):
    """Unknown fields are ignored (clients send more than a server reads); explicit nulls mean 'not given'."""

    model_config = ConfigDict(strict=True, extra="ignore")


class Sampling(Fields):
    """What every generation request may set (OpenAI chat and completions, Anthropic messages)."""

    model: str | None = None
    max_tokens: Positive | None = None
    stream: bool | None = None
    ignore_eos: bool | None = None  # extension (vLLM, llama.cpp): end-of-sequence tokens are never sampled
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Fraction | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None  # -1 and 0: off
    min_p: Fraction | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[Int, Field(ge=-(2**63), le=2**64 - 1)] | None = None


class StreamOptions(Fields):
    include_usage: bool | None = None


class OpenAIFields(Sampling):
    max_completion_tokens: Positive | None = None
    n: Literal[1] | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatFields(OpenAIFields):
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    parallel_tool_calls: bool | None = None


class CompletionFields(OpenAIFields):
    logprobs: TopLogprobs | None = None
