"""`rankstage serve | rank | recommend | requests | model-server`: flags map onto the serving config here only."""

from __future__ import annotations

import argparse
import sys


def cmd_serve(args: argparse.Namespace) -> None:
    from features.spec import apply_overrides, read_document
    from serving.config import parse_serving_config
    from serving.service import serve

    data = apply_overrides(read_document(args.config, "serving config file") or {}, args.set)
    serve(parse_serving_config(data, args.config), ready_file=args.ready_file)


def cmd_rank(args: argparse.Namespace) -> None:
    import grpc

    from serving.client import RankingClient, format_response, load_request

    request = load_request(args.request)
    if args.top_k is not None:
        request.top_k = args.top_k
    if args.profile is not None:
        request.fusion_profile = args.profile
    request.return_predictions = True
    ca = open(args.tls_ca, "rb").read() if args.tls_ca else None
    with RankingClient(args.address, args.timeout, ca, args.tls_server_name) as client:
        try:
            resp = client.send(request)
        except grpc.RpcError as err:
            print(f"rankstage rank: {err.code().name}: {err.details()}", file=sys.stderr)
            raise SystemExit(1) from None
    print(format_response(resp))


def cmd_recommend(args: argparse.Namespace) -> None:
    import grpc
    import yaml

    from serving.client import RankingClient, format_response

    context = {}
    for item in args.context:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"rankstage recommend: --context {item!r}: expected name=value")
        context[key] = yaml.safe_load(value)
    with RankingClient(args.address, args.timeout) as client:
        try:
            resp = client.recommend({args.user_column: args.user_id}, context, args.num_candidates, args.top_k,
                                    return_predictions=True)
        except grpc.RpcError as err:
            print(f"rankstage recommend: {err.code().name}: {err.details()}", file=sys.stderr)
            raise SystemExit(1) from None
    print(f"candidates: {resp.num_candidates} from {resp.candidate_source} ({resp.retrieval_model} version "
          f"{resp.retrieval_version}, {resp.retrieve_ms:.1f} ms)")
    print(format_response(resp.ranked))


def cmd_requests(args: argparse.Namespace) -> None:
    from features.spec import load_config
    from serving.requests import dump_requests, logged_requests

    config = load_config(args.config, args.set, None)
    for path in dump_requests(logged_requests(config, args.n, args.data, top_k=args.top_k), args.out):
        print(path)


def cmd_model_server(args: argparse.Namespace) -> None:
    from serving import model_server  # TensorFlow: imported only when this command runs

    model_server.main(args)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC ranking service (Rank, health, reflection, /metrics)")
    p.add_argument("--config", required=True, help="serving config (YAML), e.g. configs/serving.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serving config field, e.g. --set server.port=50052 (repeatable)")
    p.add_argument("--ready-file", help="write the bound port here once a model is warm (for scripts)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rank", help="send one JSON request to the ranking service and print the ranked list")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--request", required=True, help="JSON request (see serving/client.py)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--profile", help="fusion profile (default: the request's, else the config's default)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    p.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server")
    p.add_argument("--tls-server-name", help="expected server name in its certificate")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("recommend", help="ask the ranking service for a user's recommendations (retrieve -> rank)")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--user-id", type=int, required=True)
    p.add_argument("--user-column", default="user_id", help="name of the user id feature")
    p.add_argument("--context", nargs="*", default=[], metavar="NAME=VALUE", help="e.g. tab=1 hourmin=1400")
    p.add_argument("--num-candidates", type=int, default=0, help="retrieved for ranking (0: the server's default)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("requests", help="write JSON rank requests of real logged users (ids and context only)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", help="log (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_requests)

    p = sub.add_parser("model-server", help="serve exported SavedModels over TF Serving's gRPC API")
    from serving.config import model_server_arguments

    model_server_arguments(p)
    p.set_defaults(func=cmd_model_server)
