"""Tests of anchorserve_client.connect: TLS, mTLS, server name override and bearer tokens,
against the in-process fake PrefillService on a TLS port (certificates from
scripts/make_test_certs.sh, which needs the openssl command)."""

import os
import subprocess
import sys
import tempfile
import unittest
from concurrent import futures
from unittest import mock

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anchorserve_client  # noqa: E402
from anchorserve_client import AnchorServeError  # noqa: E402
from anchorserve_client._stubs import prefill_pb2_grpc  # noqa: E402

from fake_server import FakeModel, FakeServer, FakeServicer, Script, make_output, stream_of  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
_MAKE_CERTS = os.path.join(_ROOT, 'scripts', 'make_test_certs.sh')


def _good_stream(model):
    return lambda request: Script(stream_of(make_output(request, model), 64))


class _TlsFakeServer:
    """FakeServicer on a TLS port of 127.0.0.1 (mTLS when client_ca is given)."""

    def __init__(self, certs: str, client_ca: bool = False):
        self.model = FakeModel()
        self.servicer = FakeServicer(self.model)
        self.servicer.script = _good_stream(self.model)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(self.servicer, self._server)

        def read(name):
            with open(os.path.join(certs, name), 'rb') as f:
                return f.read()

        credentials = grpc.ssl_server_credentials(
            [(read('server.key'), read('server.pem'))],
            root_certificates=read('ca.pem') if client_ca else None,
            require_client_auth=client_ca)
        port = self._server.add_secure_port('127.0.0.1:0', credentials)
        self.port = port
        self.target = f'127.0.0.1:{port}'
        self._server.start()

    def stop(self):
        self._server.stop(grace=None)


class SecurityTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls._dir = tempfile.TemporaryDirectory()
        cls.certs = os.path.join(cls._dir.name, 'certs')
        cls.other = os.path.join(cls._dir.name, 'other')
        for folder, name in ((cls.certs, 'python'), (cls.other, 'other')):
            subprocess.run(['bash', _MAKE_CERTS, folder, name], check=True,
                           stdout=subprocess.DEVNULL)

    @classmethod
    def tearDownClass(cls):
        cls._dir.cleanup()

    def cert(self, name, folder=None):
        return os.path.join(folder or self.certs, name)

    def tls_server(self, client_ca=False):
        server = _TlsFakeServer(self.certs, client_ca)
        self.addCleanup(server.stop)
        return server

    def test_token_goes_with_every_call_on_plaintext(self):
        with FakeServer() as server:
            server.servicer.script = _good_stream(server.servicer.model)
            with anchorserve_client.connect(server.target, token='tok-123') as channel:
                anchorserve_client.prefill(channel, [1, 2, 3], timeout=30)
                anchorserve_client.prefill(channel, [4], timeout=30, metadata=[('x-id', '7')])
            self.assertEqual(server.servicer.metadata[0].get('authorization'), 'Bearer tok-123')
            self.assertEqual(server.servicer.metadata[1].get('authorization'), 'Bearer tok-123')
            self.assertEqual(server.servicer.metadata[1].get('x-id'), '7')

    def test_token_file_and_environment(self):
        path = os.path.join(self._dir.name, 'token')
        with open(path, 'w') as f:
            f.write('\n  from-file  \n')
        with FakeServer() as server:
            server.servicer.script = _good_stream(server.servicer.model)
            with anchorserve_client.connect(server.target, token_file=path) as channel:
                anchorserve_client.prefill(channel, [1], timeout=30)
            with mock.patch.dict(os.environ, {'ANCHOR_TOKEN': 'from-env'}):
                with anchorserve_client.connect(server.target) as channel:
                    anchorserve_client.prefill(channel, [1], timeout=30)
            with mock.patch.dict(os.environ, {}, clear=True):
                with anchorserve_client.connect(server.target) as channel:
                    anchorserve_client.prefill(channel, [1], timeout=30)
            tokens = [m.get('authorization') for m in server.servicer.metadata]
            self.assertEqual(tokens, ['Bearer from-file', 'Bearer from-env', None])

    def test_bad_options_raise_before_connecting(self):
        with self.assertRaisesRegex(ValueError, 'token'):
            anchorserve_client.connect('127.0.0.1:1', token='has space')
        with self.assertRaisesRegex(ValueError, 'not both'):
            anchorserve_client.connect('127.0.0.1:1', token='a', token_file='b')
        with self.assertRaisesRegex(ValueError, 'go together'):
            anchorserve_client.connect('127.0.0.1:1', tls_cert_file=self.cert('client.pem'))
        with self.assertRaisesRegex(ValueError, 'needs tls_ca_file'):
            anchorserve_client.connect('127.0.0.1:1', tls_server_name='localhost')
        with self.assertRaisesRegex(ValueError, 'tls_ca_file /nonexistent'):
            anchorserve_client.connect('127.0.0.1:1', tls_ca_file='/nonexistent')

    def test_tls_with_the_right_ca_only(self):
        server = self.tls_server()
        with anchorserve_client.connect(server.target, tls_ca_file=self.cert('ca.pem')) as channel:
            self.assertEqual(anchorserve_client.model_info(channel, timeout=30).num_layers,
                             server.model.num_layers)
        wrong_ca = self.cert('ca.pem', self.other)
        with anchorserve_client.connect(server.target, tls_ca_file=wrong_ca) as channel:
            with self.assertRaises(AnchorServeError) as raised:
                anchorserve_client.model_info(channel, timeout=30)
            self.assertEqual(raised.exception.code, grpc.StatusCode.UNAVAILABLE)
        # Plaintext to a TLS port fails.
        with self.assertRaises(AnchorServeError) as raised:
            anchorserve_client.model_info(server.target, timeout=30)
        self.assertEqual(raised.exception.code, grpc.StatusCode.UNAVAILABLE)

    def test_server_name_override(self):
        server = self.tls_server()
        ca = self.cert('ca.pem')
        with anchorserve_client.connect(server.target, tls_ca_file=ca,
                                        tls_server_name='localhost') as channel:
            anchorserve_client.model_info(channel, timeout=30)
        with anchorserve_client.connect(server.target, tls_ca_file=ca,
                                        tls_server_name='not-in-the-cert.example') as channel:
            with self.assertRaises(AnchorServeError) as raised:
                anchorserve_client.model_info(channel, timeout=30)
            self.assertEqual(raised.exception.code, grpc.StatusCode.UNAVAILABLE)

    def test_mutual_tls_needs_the_client_certificate(self):
        server = self.tls_server(client_ca=True)
        ca = self.cert('ca.pem')
        with anchorserve_client.connect(server.target, tls_ca_file=ca) as channel:
            with self.assertRaises(AnchorServeError) as raised:
                anchorserve_client.model_info(channel, timeout=30)
            self.assertEqual(raised.exception.code, grpc.StatusCode.UNAVAILABLE)
        with anchorserve_client.connect(server.target, tls_ca_file=ca,
                                        tls_cert_file=self.cert('client.pem'),
                                        tls_key_file=self.cert('client.key'),
                                        token='t') as channel:
            anchorserve_client.prefill(channel, [5, 6], timeout=30)
        self.assertEqual(server.servicer.metadata[-1].get('authorization'), 'Bearer t')


if __name__ == '__main__':
    unittest.main()
