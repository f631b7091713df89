"""llama-cpp-python's `llama_types`: the shapes of messages, tools and results (plain dicts here)."""
from __future__ import annotations

from typing import Any, Dict, List

JsonType = Any
ChatCompletionRequestMessage = Dict[str, Any]
ChatCompletionTool = Dict[str, Any]
ChatCompletionToolChoiceOption = Any
ChatCompletionRequestResponseFormat = Dict[str, Any]
ChatCompletionMessageToolCall = Dict[str, Any]
ChatCompletionResponseMessage = Dict[str, Any]
CreateChatCompletionResponse = Dict[str, Any]
CreateChatCompletionStreamResponse = Dict[str, Any]
CreateCompletionResponse = Dict[str, Any]
CreateCompletionStreamResponse = Dict[str, Any]
CreateEmbeddingResponse = Dict[str, Any]
Embedding = Dict[str, Any]
EmbeddingUsage = Dict[str, int]
CompletionUsage = Dict[str, int]
ChatCompletionFunctions = List[Dict[str, Any]]
