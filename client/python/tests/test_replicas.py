"""Target forms, round-robin balancing and retries of anchorserve_client over several replicas.

Three fake servers on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux loopback answers on all of
127.0.0.0/8) stand for three replicas.
"""

import json
import os
import sys
import unittest

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anchorserve_client  # noqa: E402
from anchorserve_client import AnchorServeError  # noqa: E402

from fake_server import FakeModel, FakeServer, Script, make_output, stream_of  # noqa: E402

HOSTS = ('127.0.0.1', '127.0.0.2', '127.0.0.3')


class GrpcTargetTest(unittest.TestCase):

    def test_single_targets_and_uris_pass_through(self):
        for target in ('127.0.0.1:50051', 'localhost:50051', 'dns:///anchorserve-headless:50051',
                       'dns://10.0.0.10:53/anchorserve:50051', 'ipv4:10.0.0.1:1,10.0.0.2:2',
                       'IPV6:[::1]:1,[::1]:2', 'unix:/tmp/anchorserve.sock', '[::1]:50051'):
            with self.subTest(target=target):
                self.assertEqual(anchorserve_client.grpc_target(target), target)

    def test_lists_become_one_family_uri(self):
        self.assertEqual(anchorserve_client.grpc_target('10.0.0.1:50051,10.0.0.2:50052'),
                         'ipv4:10.0.0.1:50051,10.0.0.2:50052')
        self.assertEqual(anchorserve_client.grpc_target(' 127.0.0.1:1 , 127.0.0.2:2 '),
                         'ipv4:127.0.0.1:1,127.0.0.2:2')
        self.assertEqual(anchorserve_client.grpc_target('[::1]:1,[fd00::2]:65535'),
                         'ipv6:[::1]:1,[fd00::2]:65535')

    def test_bad_lists_name_the_element(self):
        cases = {
            'pod-a:50051,pod-b:50051': "'pod-a:50051' is not an IP address",
            '10.0.0.1:1,,10.0.0.2:2': "list element '' is empty",
            '10.0.0.1,10.0.0.2:1': "'10.0.0.1' has no port",
            '10.0.0.1:0,10.0.0.2:1': "'10.0.0.1:0' has no port in [1, 65535]",
            '10.0.0.1:65536,10.0.0.2:1': "has no port in [1, 65535]",
            '::1:5,::2:5': "'::1:5' is an IPv6 address without brackets",
            '[::1]5,[::2]:5': "has no ']:port'",
            '[10.0.0.1]:5,[::2]:5': 'is not an IPv6 address in brackets',
            '[::1]:1,10.0.0.1:2': 'mixes IPv4 and IPv6',
        }
        for target, message in cases.items():
            with self.subTest(target=target):
                with self.assertRaises(ValueError) as context:
                    anchorserve_client.grpc_target(target)
                self.assertIn(message, str(context.exception))
        for target in ('', None, 50051):
            with self.subTest(target=target), self.assertRaises(ValueError):
                anchorserve_client.grpc_target(target)

    def test_channel_options_carry_the_service_config(self):
        options = dict(anchorserve_client.channel_options())
        config = json.loads(options['grpc.service_config'])
        self.assertEqual(config['loadBalancingConfig'], [{'round_robin': {}}])
        policy = config['methodConfig'][0]['retryPolicy']
        self.assertEqual(policy['retryableStatusCodes'], ['UNAVAILABLE', 'CANCELLED'])
        methods = {name['method'] for name in config['methodConfig'][0]['name']}
        self.assertEqual(methods, {'Attend', 'GetServerInfo', 'Prefill', 'GetModelInfo'})
        self.assertEqual(options['grpc.enable_retries'], 1)


class ReplicasTest(unittest.TestCase):

    def setUp(self):
        self.model = FakeModel()
        self.servers = []
        for host in HOSTS:
            server = FakeServer(self.model, host=host).__enter__()
            self.addCleanup(server.__exit__, None, None, None)
            self.servers.append(server)
        self.list_target = ','.join(server.target for server in self.servers)
        self.channel = anchorserve_client.create_channel(self.list_target)
        self.addCleanup(self.channel.close)
        for server in self.servers:
            self.answer_well(server)

    def answer_well(self, server, first_answers=()):
        """Prefill answers `first_answers` (Scripts) in turn, then correct streams."""
        pending = list(first_answers)

        def script(request):
            if pending:
                return pending.pop(0)
            return Script(stream_of(make_output(request, self.model), 64))

        server.servicer.script = script

    def test_requests_spread_over_every_replica(self):
        for _ in range(30):
            anchorserve_client.model_info(self.channel, timeout=10)
        for _ in range(15):
            result = anchorserve_client.prefill(self.channel, [1, 2, 3], timeout=10)
            self.assertEqual(result.num_tokens, 3)
        for server in self.servers:
            # round_robin takes the replicas in turn once connected: about 10 and 5 each.
            self.assertGreaterEqual(server.servicer.info_calls, 5, server.target)
            self.assertGreaterEqual(len(server.servicer.requests), 2, server.target)
        self.assertEqual(sum(server.servicer.info_calls for server in self.servers), 30)

    def test_a_list_string_works_as_target(self):
        info = anchorserve_client.model_info(self.list_target, timeout=10)
        self.assertEqual(info.fingerprint, self.model.fingerprint)

    def test_refused_calls_are_retried_on_another_replica(self):
        # One refusal per replica, both kinds: at most 3 of the policy's 5 attempts can fail,
        # whichever replicas round_robin picks (two per replica could exhaust all 5).
        refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.UNAVAILABLE)
        for server, code in zip(self.servers, refused):
            server.servicer.info_failures = [code]
        for _ in range(3):
            info = anchorserve_client.model_info(self.channel, timeout=10)
            self.assertEqual(info.fingerprint, self.model.fingerprint)
        total = sum(server.servicer.info_calls for server in self.servers)
        self.assertGreaterEqual(total, 4)  # the first call's first attempt was refused

        # Prefill: retried while nothing was received ...
        for server in self.servers:
            self.answer_well(server, [Script([], code=grpc.StatusCode.UNAVAILABLE,
                                             details='server is draining')])
        result = anchorserve_client.prefill(self.channel, [4, 5], timeout=10)
        self.assertEqual(result.num_tokens, 2)
        self.assertGreaterEqual(sum(len(s.servicer.requests) for s in self.servers), 2)

    def test_prefill_is_not_retried_after_its_header(self):
        def header_then_unavailable(request):
            messages = stream_of(make_output(request, self.model), 64)[:1]
            return Script(messages, code=grpc.StatusCode.UNAVAILABLE, details='draining')

        for server in self.servers:
            server.servicer.script = header_then_unavailable
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.prefill(self.channel, [1, 2], timeout=10)
        self.assertEqual(context.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(sum(len(s.servicer.requests) for s in self.servers), 1)

    def test_other_errors_are_not_retried(self):
        for server in self.servers:
            server.servicer.info_error = grpc.StatusCode.FAILED_PRECONDITION
        with self.assertRaises(AnchorServeError) as context:
            anchorserve_client.model_info(self.channel, timeout=10)
        self.assertEqual(context.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(sum(server.servicer.info_calls for server in self.servers), 1)


if __name__ == '__main__':
    unittest.main()
