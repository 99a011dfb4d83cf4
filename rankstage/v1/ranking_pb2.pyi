from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Int64List(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class FloatList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FeatureColumn(_message.Message):
    __slots__ = ("int64_values", "float_values", "string_values", "row_lengths")
    INT64_VALUES_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUES_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUES_FIELD_NUMBER: _ClassVar[int]
    ROW_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    int64_values: Int64List
    float_values: FloatList
    string_values: StringList
    row_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, int64_values: _Optional[_Union[Int64List, _Mapping]] = ..., float_values: _Optional[_Union[FloatList, _Mapping]] = ..., string_values: _Optional[_Union[StringList, _Mapping]] = ..., row_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class Candidates(_message.Message):
    __slots__ = ("item_ids", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    item_ids: FeatureColumn
    features: _containers.MessageMap[str, FeatureColumn]
    def __init__(self, item_ids: _Optional[_Union[FeatureColumn, _Mapping]] = ..., features: _Optional[_Mapping[str, FeatureColumn]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user_features", "context_features", "candidates", "top_k", "fusion_profile", "return_predictions")
    class UserFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    class ContextFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FUSION_PROFILE_FIELD_NUMBER: _ClassVar[int]
    RETURN_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_features: _containers.MessageMap[str, FeatureColumn]
    context_features: _containers.MessageMap[str, FeatureColumn]
    candidates: Candidates
    top_k: int
    fusion_profile: str
    return_predictions: bool
    def __init__(self, request_id: _Optional[str] = ..., user_features: _Optional[_Mapping[str, FeatureColumn]] = ..., context_features: _Optional[_Mapping[str, FeatureColumn]] = ..., candidates: _Optional[_Union[Candidates, _Mapping]] = ..., top_k: _Optional[int] = ..., fusion_profile: _Optional[str] = ..., return_predictions: bool = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "signature", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    signature: str
    backend: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., signature: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "item_ids", "candidate_indices", "scores", "predictions", "model", "fusion_profile", "fusion_version", "calibration_version", "stage_ms")
    class PredictionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FloatList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FloatList, _Mapping]] = ...) -> None: ...
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDICES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FUSION_PROFILE_FIELD_NUMBER: _ClassVar[int]
    FUSION_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_ids: FeatureColumn
    candidate_indices: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    predictions: _containers.MessageMap[str, FloatList]
    model: ModelInfo
    fusion_profile: str
    fusion_version: str
    calibration_version: str
    stage_ms: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., item_ids: _Optional[_Union[FeatureColumn, _Mapping]] = ..., candidate_indices: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., predictions: _Optional[_Mapping[str, FloatList]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., fusion_profile: _Optional[str] = ..., fusion_version: _Optional[str] = ..., calibration_version: _Optional[str] = ..., stage_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("request_id", "user_features", "context_features", "num_candidates", "top_k", "fusion_profile", "return_predictions")
    class UserFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    class ContextFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FeatureColumn
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FeatureColumn, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FUSION_PROFILE_FIELD_NUMBER: _ClassVar[int]
    RETURN_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_features: _containers.MessageMap[str, FeatureColumn]
    context_features: _containers.MessageMap[str, FeatureColumn]
    num_candidates: int
    top_k: int
    fusion_profile: str
    return_predictions: bool
    def __init__(self, request_id: _Optional[str] = ..., user_features: _Optional[_Mapping[str, FeatureColumn]] = ..., context_features: _Optional[_Mapping[str, FeatureColumn]] = ..., num_candidates: _Optional[int] = ..., top_k: _Optional[int] = ..., fusion_profile: _Optional[str] = ..., return_predictions: bool = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("ranked", "candidate_source", "retrieval_model", "retrieval_version", "num_candidates", "retrieve_ms")
    RANKED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_MS_FIELD_NUMBER: _ClassVar[int]
    ranked: RankResponse
    candidate_source: str
    retrieval_model: str
    retrieval_version: int
    num_candidates: int
    retrieve_ms: float
    def __init__(self, ranked: _Optional[_Union[RankResponse, _Mapping]] = ..., candidate_source: _Optional[str] = ..., retrieval_model: _Optional[str] = ..., retrieval_version: _Optional[int] = ..., num_candidates: _Optional[int] = ..., retrieve_ms: _Optional[float] = ...) -> None: ...
