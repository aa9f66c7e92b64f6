# cython: language_level=3
"""HTTP/2 framing over libnghttp2, for the server's front (front.py): one ``Session`` per connection, fed the
bytes that arrive (``receive``) and asked for the bytes to send (``output``); what happens on the connection
comes back as calls on a handler object, all on the caller's thread, inside ``receive`` or ``output``:

    handler.on_headers(stream_id, headers, end_stream)   a request (server) or response/trailers (client)
    handler.on_data(stream_id, data)                      a DATA chunk (bytes); the handler must ``consume`` it
    handler.on_end_stream(stream_id)                      the peer ended its side with a DATA frame
    handler.on_stream_close(stream_id, error_code)        the stream is gone (error_code 0: cleanly)
    handler.on_data_taken(stream_id, size)                ``size`` bytes queued with ``send_data`` went out

Headers are lists of (name, value) bytes pairs; nghttp2 has already checked them against HTTP/2's rules
(pseudo-headers, lower-case names, te: trailers). Window updates are the handler's: a session never opens
its receive window on its own (``consume`` does), so a proxy can hold a fast sender to the pace of the
peer it forwards to.

Outgoing bodies are queues of bytes per stream: ``send_data`` appends, ``end_data`` closes the queue with
or without trailers. nghttp2 pulls from the queue as the peer's flow-control window allows; a queue that
runs dry is deferred and ``send_data``/``end_data`` wake it.

Nothing here knows gRPC: the front gives the bytes their meaning.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from "sys/types.h":
    ctypedef long ssize_t

cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass

    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags

    ctypedef enum nghttp2_headers_category:
        NGHTTP2_HCAT_REQUEST
        NGHTTP2_HCAT_RESPONSE
        NGHTTP2_HCAT_PUSH_RESPONSE
        NGHTTP2_HCAT_HEADERS

    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        nghttp2_headers_category cat

    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers

    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags

    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value

    ctypedef union nghttp2_data_source:
        int fd
        void *ptr

    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length, uint32_t *data_flags,
        nghttp2_data_source *source, void *user_data) noexcept

    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback

    ctypedef struct nghttp2_priority_spec:
        pass

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_END_STREAM
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_CALLBACK_FAILURE
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        NGHTTP2_NV_FLAG_NONE
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(
        nghttp2_session_callbacks *cbs,
        int (*cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(
        nghttp2_session_callbacks *cbs,
        int (*cb)(nghttp2_session *, const nghttp2_frame *, void *) noexcept)
    void nghttp2_session_callbacks_set_on_header_callback(
        nghttp2_session_callbacks *cbs,
        int (*cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *, size_t,
                  uint8_t, void *) noexcept)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        nghttp2_session_callbacks *cbs,
        int (*cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *) noexcept)
    void nghttp2_session_callbacks_set_on_stream_close_callback(
        nghttp2_session_callbacks *cbs, int (*cb)(nghttp2_session *, int32_t, uint32_t, void *) noexcept)

    int nghttp2_option_new(nghttp2_option **option_ptr)
    void nghttp2_option_del(nghttp2_option *option)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val)
    void nghttp2_option_set_no_closed_streams(nghttp2_option *option, int val)

    int nghttp2_session_server_new2(nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
                                    void *user_data, const nghttp2_option *option)
    int nghttp2_session_client_new2(nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
                                    void *user_data, const nghttp2_option *option)
    void nghttp2_session_del(nghttp2_session *session)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *data, size_t length)
    ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr)
    int nghttp2_session_want_read(nghttp2_session *session)
    int nghttp2_session_want_write(nghttp2_session *session)
    int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_consume_connection(nghttp2_session *session, size_t size)
    int nghttp2_session_consume_stream(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                                              int32_t window_size)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session)
    int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags, const nghttp2_settings_entry *iv,
                                size_t niv)
    int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen,
                                const nghttp2_data_provider *data_prd)
    int32_t nghttp2_submit_request(nghttp2_session *session, const nghttp2_priority_spec *pri_spec,
                                   const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd,
                                   void *stream_user_data)
    int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen)
    int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id, uint32_t error_code)
    int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id, uint32_t error_code,
                              const uint8_t *opaque_data, size_t opaque_data_len)
    int nghttp2_submit_shutdown_notice(nghttp2_session *session)
    const char *nghttp2_strerror(int lib_error_code)


# HTTP/2 error codes the front uses (RFC 9113, section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
MAX_CONCURRENT_STREAMS = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
INITIAL_WINDOW_SIZE = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE


class H2Error(Exception):
    """The connection is broken (a protocol error, or a handler that raised): close it."""


cdef class _Outgoing:
    """One stream's body on its way out: chunks not yet taken, and how it ends."""
    cdef list chunks
    cdef Py_ssize_t offset      # into chunks[0]
    cdef bint ended
    cdef object trailers        # None, or the headers to end with
    cdef bint deferred          # the read callback found it dry; resume on the next send

    def __cinit__(self):
        self.chunks = []
        self.offset = 0
        self.ended = False
        self.trailers = None
        self.deferred = False


cdef class _Headers:
    """An nghttp2_nv array over Python bytes (kept alive by ``keep`` while nghttp2 copies them)."""
    cdef nghttp2_nv *nva
    cdef size_t count
    cdef list keep

    def __cinit__(self, headers):
        self.keep = []
        self.count = len(headers)
        self.nva = <nghttp2_nv *>malloc(max(self.count, 1) * sizeof(nghttp2_nv))
        if self.nva == NULL:
            raise MemoryError()
        cdef size_t n = 0
        cdef bytes name, value
        for name, value in headers:
            self.keep.append(name)
            self.keep.append(value)
            self.nva[n].name = <uint8_t *>PyBytes_AS_STRING(name)
            self.nva[n].namelen = PyBytes_GET_SIZE(name)
            self.nva[n].value = <uint8_t *>PyBytes_AS_STRING(value)
            self.nva[n].valuelen = PyBytes_GET_SIZE(value)
            self.nva[n].flags = NGHTTP2_NV_FLAG_NONE
            n += 1

    def __dealloc__(self):
        free(self.nva)


cdef class Session:
    cdef nghttp2_session *_session
    cdef object _handler
    cdef dict _incoming_headers   # stream id -> list of (name, value) while a header block arrives
    cdef dict _outgoing           # stream id -> _Outgoing
    cdef object _error            # the first exception a handler raised inside a callback
    cdef readonly bint server

    def __init__(self, handler, *, bint server):
        if self._session != NULL:
            raise RuntimeError("a Session is set up once")
        self._handler = handler
        self._incoming_headers = {}
        self._outgoing = {}
        self._error = None
        self.server = server
        cdef nghttp2_session_callbacks *callbacks
        cdef nghttp2_option *option
        if nghttp2_session_callbacks_new(&callbacks) != 0:
            raise MemoryError()
        if nghttp2_option_new(&option) != 0:
            nghttp2_session_callbacks_del(callbacks)
            raise MemoryError()
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(callbacks, _on_header)
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, _on_frame_recv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, _on_data_chunk_recv)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, _on_stream_close)
        nghttp2_option_set_no_auto_window_update(option, 1)
        # Closed streams are kept only for RFC 7540's priority tree, which gRPC does not use: up to the
        # concurrent-stream limit (4,096) of them a connection, for nothing.
        nghttp2_option_set_no_closed_streams(option, 1)
        cdef int rv
        if server:
            rv = nghttp2_session_server_new2(&self._session, callbacks, <void *>self, option)
        else:
            rv = nghttp2_session_client_new2(&self._session, callbacks, <void *>self, option)
        nghttp2_session_callbacks_del(callbacks)
        nghttp2_option_del(option)
        if rv != 0:
            raise MemoryError(nghttp2_strerror(rv).decode())

    def __dealloc__(self):
        if self._session != NULL:
            nghttp2_session_del(self._session)

    cdef _check(self, int rv, what):
        if rv < 0:
            raise H2Error(f"{what}: {nghttp2_strerror(rv).decode()}")

    cdef _raise_pending(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- the connection ------------------------------------------------------------------------------

    def settings(self, entries, *, int connection_window=0):
        """Send SETTINGS ((id, value) pairs; a session starts with one) and, if given, open the connection's
        receive window to ``connection_window`` bytes."""
        cdef size_t count = len(entries)
        cdef nghttp2_settings_entry *iv = <nghttp2_settings_entry *>malloc(max(count, 1) * sizeof(nghttp2_settings_entry))
        if iv == NULL:
            raise MemoryError()
        try:
            for n, (key, value) in enumerate(entries):
                iv[n].settings_id = key
                iv[n].value = value
            self._check(nghttp2_submit_settings(self._session, NGHTTP2_FLAG_NONE, iv, count), "settings")
        finally:
            free(iv)
        if connection_window:
            self._check(nghttp2_session_set_local_window_size(self._session, NGHTTP2_FLAG_NONE, 0,
                                                              connection_window), "window")

    def receive(self, const uint8_t[::1] data not None):
        """Feed bytes that arrived; handler calls happen in here. Raises H2Error on a broken connection."""
        cdef ssize_t rv = nghttp2_session_mem_recv(self._session, &data[0], len(data)) if len(data) else 0
        self._raise_pending()
        if rv < 0:
            raise H2Error(nghttp2_strerror(rv).decode())

    def output(self):
        """Every byte the session has to send now (b"" if none)."""
        cdef const uint8_t *chunk
        cdef ssize_t length
        parts = []
        while True:
            length = nghttp2_session_mem_send(self._session, &chunk)
            if length < 0:
                self._raise_pending()
                raise H2Error(nghttp2_strerror(length).decode())
            if length == 0:
                break
            parts.append(PyBytes_FromStringAndSize(<const char *>chunk, length))
        self._raise_pending()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def wants_io(self):
        """False once both sides are done (after GOAWAY, every stream closed): close the connection."""
        return bool(nghttp2_session_want_read(self._session) or nghttp2_session_want_write(self._session))

    def goaway(self, uint32_t error_code=NO_ERROR, *, bint notice=False):
        """GOAWAY: ``notice`` says "no new streams soon" (streams already started finish); otherwise the final
        one, naming the last stream this side processed."""
        if notice:
            self._check(nghttp2_submit_shutdown_notice(self._session), "goaway")
        else:
            self._check(nghttp2_submit_goaway(self._session, NGHTTP2_FLAG_NONE,
                                              nghttp2_session_get_last_proc_stream_id(self._session),
                                              error_code, NULL, 0), "goaway")

    # -- streams -------------------------------------------------------------------------------------

    def consume(self, int32_t stream_id, size_t size):
        """``size`` received bytes of the stream are dealt with: open the windows for that much more."""
        if size:
            if nghttp2_session_consume(self._session, stream_id, size) < 0:
                nghttp2_session_consume_connection(self._session, size)  # the stream is gone already

    def consume_connection(self, size_t size):
        """Only the connection's window (``consume_stream`` opened the stream's earlier)."""
        if size:
            nghttp2_session_consume_connection(self._session, size)

    def consume_stream(self, int32_t stream_id, size_t size):
        """Only the stream's window: the bytes still count against the connection's until
        ``consume_connection``, which bounds what all of a connection's unfinished requests can hold."""
        if size:
            nghttp2_session_consume_stream(self._session, stream_id, size)

    def respond(self, int32_t stream_id, headers, *, bint body):
        """Response headers; with ``body`` the stream's data follows through ``send_data``/``end_data``,
        without it the headers end the stream (a trailers-only response)."""
        cdef _Headers nv = _Headers(headers)
        cdef nghttp2_data_provider provider
        provider.source.ptr = NULL
        provider.read_callback = _read_outgoing
        if body:
            self._outgoing[stream_id] = _Outgoing()
        self._check(nghttp2_submit_response(self._session, stream_id, nv.nva, nv.count,
                                            &provider if body else NULL), "response")

    def request(self, headers):
        """Start a request (client side); its body follows through ``send_data``/``end_data``. The stream id."""
        cdef _Headers nv = _Headers(headers)
        cdef nghttp2_data_provider provider
        provider.source.ptr = NULL
        provider.read_callback = _read_outgoing
        cdef int32_t stream_id = nghttp2_submit_request(self._session, NULL, nv.nva, nv.count, &provider, NULL)
        self._check(stream_id, "request")
        self._outgoing[stream_id] = _Outgoing()
        return stream_id

    def send_data(self, int32_t stream_id, bytes data not None):
        cdef _Outgoing out = self._outgoing.get(stream_id)
        if out is None or out.ended or not data:
            return
        out.chunks.append(data)
        self._resume(stream_id, out)

    def end_data(self, int32_t stream_id, trailers=None):
        """No more data on the stream: end it, with ``trailers`` (headers) if given."""
        cdef _Outgoing out = self._outgoing.get(stream_id)
        if out is None or out.ended:
            return
        out.ended = True
        out.trailers = trailers
        self._resume(stream_id, out)

    cdef _resume(self, int32_t stream_id, _Outgoing out):
        if out.deferred:
            out.deferred = False
            nghttp2_session_resume_data(self._session, stream_id)

    def reset(self, int32_t stream_id, uint32_t error_code=CANCEL):
        self._outgoing.pop(stream_id, None)
        nghttp2_submit_rst_stream(self._session, NGHTTP2_FLAG_NONE, stream_id, error_code)

    def queued(self, int32_t stream_id):
        """Bytes given to ``send_data`` that have not gone out yet."""
        cdef _Outgoing out = self._outgoing.get(stream_id)
        if out is None:
            return 0
        return sum(len(chunk) for chunk in out.chunks) - out.offset


# -- callbacks (C -> the Session -> its handler) -------------------------------------------------------

cdef int _fail(Session self) noexcept:
    """A handler raised: keep the exception for receive/output to raise, and stop the session."""
    import sys
    if self._error is None:
        self._error = sys.exc_info()[1]
    return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept with gil:
    cdef Session self = <Session>user_data
    self._incoming_headers[frame.hd.stream_id] = []
    return 0


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                    const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept with gil:
    cdef Session self = <Session>user_data
    block = self._incoming_headers.get(frame.hd.stream_id)
    if block is not None:
        block.append((PyBytes_FromStringAndSize(<const char *>name, namelen),
                      PyBytes_FromStringAndSize(<const char *>value, valuelen)))
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept with gil:
    cdef Session self = <Session>user_data
    cdef int32_t stream_id = frame.hd.stream_id
    cdef bint end_stream = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    try:
        if frame.hd.type == NGHTTP2_HEADERS:
            headers = self._incoming_headers.pop(stream_id, None)
            if headers is not None:
                self._handler.on_headers(stream_id, headers, end_stream)
        elif frame.hd.type == NGHTTP2_DATA and end_stream:
            self._handler.on_end_stream(stream_id)
    except BaseException:
        return _fail(self)
    return 0


cdef int _on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                             size_t length, void *user_data) noexcept with gil:
    cdef Session self = <Session>user_data
    try:
        self._handler.on_data(stream_id, PyBytes_FromStringAndSize(<const char *>data, length))
    except BaseException:
        return _fail(self)
    return 0


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept with gil:
    cdef Session self = <Session>user_data
    self._outgoing.pop(stream_id, None)
    self._incoming_headers.pop(stream_id, None)
    try:
        self._handler.on_stream_close(stream_id, error_code)
    except BaseException:
        return _fail(self)
    return 0


cdef ssize_t _read_outgoing(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept with gil:
    """nghttp2 wants up to ``length`` bytes of the stream's body: copy them from its queue, defer when the
    queue is dry, end the stream (or hand over to the trailers) when the queue is closed and empty."""
    cdef Session self = <Session>user_data
    cdef _Outgoing out = self._outgoing.get(stream_id)
    cdef size_t copied = 0, take
    cdef bytes chunk
    cdef _Headers nv
    if out is None:
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return 0
    try:
        while copied < length and out.chunks:
            chunk = out.chunks[0]
            take = min(length - copied, <size_t>(PyBytes_GET_SIZE(chunk) - out.offset))
            memcpy(buf + copied, PyBytes_AS_STRING(chunk) + out.offset, take)
            copied += take
            out.offset += take
            if out.offset == PyBytes_GET_SIZE(chunk):
                out.chunks.pop(0)
                out.offset = 0
        if not out.chunks and out.ended:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if out.trailers:
                data_flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                nv = _Headers(out.trailers)
                nghttp2_submit_trailer(session, stream_id, nv.nva, nv.count)
            del self._outgoing[stream_id]
        elif copied == 0:
            out.deferred = True
            return NGHTTP2_ERR_DEFERRED
        if copied:
            self._handler.on_data_taken(stream_id, copied)
    except BaseException:
        return _fail(self)
    return copied
