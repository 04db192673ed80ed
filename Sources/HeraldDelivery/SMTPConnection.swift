import CCurl
import Foundation

/// A reusable SMTP client session built on one libcurl easy handle.
///
/// libcurl keeps the handle's last connection open after a successful send and reuses it
/// for the next one to the same server, so consecutive sends skip the TCP/TLS handshake,
/// EHLO and AUTH. (libcurl drops the connection after a failed send, and will not reuse one
/// idle for more than `CURLOPT_MAXAGE_CONN`, 118 s by default.)
///
/// `send` blocks the calling thread for the whole SMTP exchange: call it from a dedicated
/// thread, never from the Swift concurrency cooperative pool. A libcurl handle must be
/// used by one thread at a time; an internal lock serialises concurrent callers, so use
/// one connection per worker for parallel delivery.
public final class SMTPConnection: @unchecked Sendable {
    /// The settings this connection was created with.
    public let settings: SMTPSettings

    // All mutable state below is only touched while holding `lock` (or in init/deinit).
    private let lock = NSLock()
    private let handle: UnsafeMutableRawPointer // CURL *
    private let errorBuffer: UnsafeMutablePointer<CChar>
    private let transcript = ReplyTranscript()
    /// EHLO keywords of the server, upper-cased, from the last EHLO seen; nil until then (a reused
    /// connection sends no EHLO, so this outlives one transfer).
    private var extensions: Set<String>?

    /// Prepares a handle for `settings`; connects lazily on the first `send`.
    public init(settings: SMTPSettings) throws(SMTPError) {
        let globalInit = CurlRuntime.initialized
        guard globalInit == CURLE_OK else { throw .transport(globalInit, detail: "curl_global_init failed") }
        guard let handle = curl_easy_init() else {
            throw .transport(curlCode: Int(CURLE_FAILED_INIT.rawValue), message: "curl_easy_init failed", detail: "")
        }
        self.settings = settings
        self.handle = handle
        self.errorBuffer = .allocate(capacity: Int(CURL_ERROR_SIZE))
        self.errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE))
        // If configuring fails, deinit still runs (all stored properties are set) and cleans up.
        try configure()
    }

    deinit {
        // Sends QUIT on the cached connection, if any; may call the debug callback,
        // which is why `transcript` must still be alive here (it is: properties are
        // released after this body).
        curl_easy_cleanup(handle)
        errorBuffer.deallocate()
    }

    /// Submits `message` (complete RFC 5322 bytes, CRLF line endings) for the given envelope
    /// and returns the server's reply to the end of DATA. Blocks; see the type's notes.
    ///
    /// A non-ASCII envelope address (RFC 6531) is sent only to a server that offers SMTPUTF8:
    /// libcurl then adds `SMTPUTF8` to MAIL FROM by itself (and writes an IDN domain as its
    /// A-label). On a fresh connection the server's extensions are learnt first with a NOOP.
    public func send(from: String, to recipients: [String], message: [UInt8]) throws(SMTPError) -> SMTPReply {
        try Self.validateEnvelopeAddress(from, allowEmpty: true)
        guard !recipients.isEmpty else { throw .invalidEnvelope("it has no recipient") }
        for recipient in recipients { try Self.validateEnvelopeAddress(recipient, allowEmpty: false) }

        lock.lock()
        defer { lock.unlock() }

        if let international = ([from] + recipients).first(where: { !$0.unicodeScalars.allSatisfy(\.isASCII) }) {
            let known = try knownExtensions()
            guard known.contains("SMTPUTF8") else { throw .smtputf8Unsupported(address: international) }
        }

        // Per-send options: envelope and body. The recipient list must outlive the
        // transfer and is detached from the handle before it is freed.
        var recipientList: UnsafeMutablePointer<curl_slist>? = nil
        defer {
            _ = herald_curl_setopt_slist(handle, CURLOPT_MAIL_RCPT, nil)
            _ = herald_curl_setopt_pointer(handle, CURLOPT_READDATA, nil)
            curl_slist_free_all(recipientList)
        }
        for recipient in recipients {
            guard let extended = curl_slist_append(recipientList, "<\(recipient)>") else {
                throw .transport(CURLE_OUT_OF_MEMORY, detail: "curl_slist_append failed")
            }
            recipientList = extended
        }
        let body = MessageReader(message)
        try check(herald_curl_setopt_string(handle, CURLOPT_MAIL_FROM, "<\(from)>"))
        try check(herald_curl_setopt_slist(handle, CURLOPT_MAIL_RCPT, recipientList))
        try check(herald_curl_setopt_long(handle, CURLOPT_INFILESIZE, message.count)) // SIZE= if offered
        try check(herald_curl_setopt_pointer(handle, CURLOPT_READDATA, Unmanaged.passUnretained(body).toOpaque()))

        errorBuffer[0] = 0
        transcript.reset()
        let result = withExtendedLifetime(body) { curl_easy_perform(handle) }

        if let seen = transcript.ehloKeywords() { extensions = seen }

        var responseCode = 0
        _ = herald_curl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &responseCode)
        // The transcript may end with the 221 reply to QUIT (libcurl closes the connection
        // after a failure); RESPONSE_CODE excludes QUIT, so pick the last reply with that code.
        let reply = transcript.lastReply(withCode: responseCode)
        let text = reply?.text ?? ""

        guard result == CURLE_OK else {
            if (400..<600).contains(responseCode) {
                throw .refused(code: responseCode, text: text, command: reply?.command ?? "")
            }
            throw .transport(result, detail: String(cString: errorBuffer))
        }
        return SMTPReply(code: responseCode, text: text)
    }

    /// Whether the server offers SMTPUTF8 (RFC 6531), asking it if no EHLO has been seen yet.
    public func supportsSMTPUTF8() throws(SMTPError) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        return try knownExtensions().contains("SMTPUTF8")
    }

    /// `extensions`, probing for them first if unknown. Call with `lock` held.
    private func knownExtensions() throws(SMTPError) -> Set<String> {
        if let extensions { return extensions }
        return try probeExtensions()
    }

    /// Connects (or reuses the connection), lets libcurl say EHLO, sends NOOP and returns the
    /// EHLO keywords; the connection stays open for the send that follows. Call with `lock` held.
    private func probeExtensions() throws(SMTPError) -> Set<String> {
        try check(herald_curl_setopt_long(handle, CURLOPT_UPLOAD, 0))
        try check(herald_curl_setopt_string(handle, CURLOPT_CUSTOMREQUEST, "NOOP"))
        defer {
            _ = herald_curl_setopt_string(handle, CURLOPT_CUSTOMREQUEST, nil)
            _ = herald_curl_setopt_long(handle, CURLOPT_UPLOAD, 1)
        }
        errorBuffer[0] = 0
        transcript.reset()
        let result = curl_easy_perform(handle)
        // A server that answered EHLO with a bare 250 (or only HELO) offers no extension.
        let seen = transcript.ehloKeywords() ?? []
        guard result == CURLE_OK else {
            var responseCode = 0
            _ = herald_curl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &responseCode)
            if (400..<600).contains(responseCode), let reply = transcript.lastReply(withCode: responseCode) {
                throw .refused(code: responseCode, text: reply.text, command: reply.command)
            }
            throw .transport(result, detail: String(cString: errorBuffer))
        }
        extensions = seen
        return seen
    }

    // MARK: - Setup

    /// Options that stay the same for every send on this handle.
    private func configure() throws(SMTPError) {
        let scheme = settings.security == .implicitTLS ? "smtps" : "smtp"
        let host = settings.host.contains(":") ? "[\(settings.host)]" : settings.host
        // The URL path is the EHLO name; libcurl uses "localhost" when it is empty.
        let url = "\(scheme)://\(host):\(settings.port)/\(settings.clientName ?? "")"
        let timeoutMS = Int((min(max(settings.timeout, 0.001), 86_400) * 1000).rounded()) // NaN/inf-safe

        try check(herald_curl_setopt_pointer(handle, CURLOPT_ERRORBUFFER, errorBuffer))
        try check(herald_curl_setopt_string(handle, CURLOPT_URL, url))
        try check(herald_curl_setopt_long(handle, CURLOPT_NOSIGNAL, 1)) // no SIGALRM in a threaded server
        try check(herald_curl_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, timeoutMS))
        try check(herald_curl_setopt_long(handle, CURLOPT_TIMEOUT_MS, timeoutMS))
        try check(herald_curl_setopt_long(handle, CURLOPT_UPLOAD, 1))
        try check(herald_curl_setopt_readfn(handle, CURLOPT_READFUNCTION, Callbacks.read))
        // The reply to NOOP (see `probeExtensions`) arrives as body data; libcurl's default prints it.
        try check(herald_curl_setopt_writefn(handle, CURLOPT_WRITEFUNCTION, Callbacks.discard))

        let useSSL = settings.security == .startTLS ? CURLUSESSL_ALL : CURLUSESSL_NONE
        try check(herald_curl_setopt_long(handle, CURLOPT_USE_SSL, Int(useSSL.rawValue)))
        if !settings.verifyPeer {
            try check(herald_curl_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, 0))
            try check(herald_curl_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, 0))
        }
        if let username = settings.username {
            try check(herald_curl_setopt_string(handle, CURLOPT_USERNAME, username))
            try check(herald_curl_setopt_string(handle, CURLOPT_PASSWORD, settings.password ?? ""))
        }

        // Server replies only reach us through the debug callback, which needs VERBOSE.
        try check(herald_curl_setopt_long(handle, CURLOPT_VERBOSE, 1))
        try check(herald_curl_setopt_debugfn(handle, CURLOPT_DEBUGFUNCTION, Callbacks.debug))
        try check(herald_curl_setopt_pointer(handle, CURLOPT_DEBUGDATA, Unmanaged.passUnretained(transcript).toOpaque()))
    }

    private func check(_ code: CURLcode) throws(SMTPError) {
        guard code == CURLE_OK else { throw .transport(code, detail: String(cString: errorBuffer)) }
    }

    /// Envelope addresses go on the wire verbatim inside `<...>`: refuse anything that
    /// could break out of the command line. Non-ASCII letters are fine (SMTPUTF8, see `send`);
    /// non-ASCII spaces, controls and format characters are not.
    private static func validateEnvelopeAddress(_ address: String, allowEmpty: Bool) throws(SMTPError) {
        if address.isEmpty {
            if allowEmpty { return } // null reverse-path "<>" for bounces
            throw .invalidEnvelope("the recipient address is empty")
        }
        let forbidden = address.unicodeScalars.contains { scalar in
            if scalar.isASCII { return scalar.value < 0x21 || scalar.value == 0x7F || scalar == "<" || scalar == ">" }
            switch scalar.properties.generalCategory {
            case .control, .format, .spaceSeparator, .lineSeparator, .paragraphSeparator, .surrogate, .privateUse, .unassigned:
                return true
            default:
                return false
            }
        }
        if forbidden {
            throw .invalidEnvelope(
                "the address \(address.debugDescription) contains a space, line break or other character that cannot be sent")
        }
    }
}

// MARK: - libcurl plumbing

/// `curl_global_init` must run once before any other libcurl call; a static `let` is
/// initialised lazily and exactly once, thread-safely.
private enum CurlRuntime {
    static let initialized: CURLcode = curl_global_init(Int(CURL_GLOBAL_DEFAULT))
}

/// C callbacks. They cannot capture context, so state arrives through the user-data
/// pointer as an unretained reference owned by the caller for the transfer's duration.
private enum Callbacks {
    static let read: curl_read_callback = { buffer, size, count, userData in
        guard let buffer, let userData else { return Int(CURL_READFUNC_ABORT) }
        let reader = Unmanaged<MessageReader>.fromOpaque(userData).takeUnretainedValue()
        return reader.read(into: buffer, capacity: size * count)
    }

    static let debug: curl_debug_callback = { _, type, data, size, userData in
        guard type == CURLINFO_HEADER_IN || type == CURLINFO_HEADER_OUT, let data, let userData else { return 0 }
        let transcript = Unmanaged<ReplyTranscript>.fromOpaque(userData).takeUnretainedValue()
        let bytes = UnsafeRawBufferPointer(start: data, count: size)
        if type == CURLINFO_HEADER_OUT { transcript.command(bytes) } else { transcript.append(bytes) }
        return 0
    }

    static let discard: curl_write_callback = { _, size, count, _ in size * count }
}

/// Feeds the message bytes to libcurl's read callback.
private final class MessageReader {
    private let bytes: [UInt8]
    private var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func read(into buffer: UnsafeMutablePointer<CChar>, capacity: Int) -> Int {
        let count = min(capacity, bytes.count - offset)
        guard count > 0 else { return 0 } // 0 = end of message
        bytes.withUnsafeBytes { source in
            UnsafeMutableRawPointer(buffer).copyMemory(from: source.baseAddress! + offset, byteCount: count)
        }
        offset += count
        return count
    }
}

/// Collects the server replies seen during one transfer (libcurl hands them to the debug
/// callback as CURLINFO_HEADER_IN, normally one line per call), each tagged with the verb of
/// the command it answers (from CURLINFO_HEADER_OUT; only the verb is kept, never AUTH data).
private final class ReplyTranscript {
    private struct Reply {
        var code: Int
        var lines: [String]
        var isComplete: Bool
        var command: String
    }

    private var replies: [Reply] = []
    private var partialLine: [UInt8] = []
    private var lastCommand = ""

    func reset() {
        replies.removeAll(keepingCapacity: true)
        partialLine.removeAll(keepingCapacity: true)
        lastCommand = ""
    }

    /// Notes a command line sent to the server: its verb (`EHLO`, `MAIL`, `RCPT`, `DATA`, …).
    func command(_ bytes: UnsafeRawBufferPointer) {
        let verb = bytes.prefix { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }.prefix(8)
        lastCommand = String(decoding: verb, as: UTF8.self).uppercased()
    }

    /// The keywords of the last complete positive EHLO reply (first line, the server's name, skipped).
    func ehloKeywords() -> Set<String>? {
        guard let reply = replies.last(where: { $0.command == "EHLO" && $0.code == 250 && $0.isComplete }) else { return nil }
        return Set(reply.lines.dropFirst().compactMap { $0.split(separator: " ").first.map { $0.uppercased() } })
    }

    /// Text (multi-line replies joined with spaces) and command of the last reply with `code`.
    func lastReply(withCode code: Int) -> (text: String, command: String)? {
        replies.last { $0.code == code }.map { ($0.lines.joined(separator: " "), $0.command) }
    }

    func append(_ bytes: UnsafeRawBufferPointer) {
        for byte in bytes {
            if byte == UInt8(ascii: "\n") {
                addLine(String(decoding: partialLine, as: UTF8.self))
                partialLine.removeAll(keepingCapacity: true)
            } else if byte != UInt8(ascii: "\r") {
                partialLine.append(byte)
            }
        }
    }

    /// Parses `NNN-text` (continuation) or `NNN text` (last line of a reply).
    private func addLine(_ line: String) {
        let utf8 = Array(line.utf8)
        guard utf8.count >= 3, let code = Int(String(decoding: utf8[0..<3], as: UTF8.self)) else { return }
        let isLast = utf8.count == 3 || utf8[3] != UInt8(ascii: "-")
        let text = utf8.count > 4 ? String(decoding: utf8[4...], as: UTF8.self) : ""
        if let current = replies.last, !current.isComplete, current.code == code {
            replies[replies.count - 1].lines.append(text)
            replies[replies.count - 1].isComplete = isLast
        } else {
            replies.append(Reply(code: code, lines: [text], isComplete: isLast, command: lastCommand))
        }
    }
}

extension SMTPError {
    /// A transport error for a libcurl result code.
    fileprivate static func transport(_ code: CURLcode, detail: String) -> SMTPError {
        .transport(curlCode: Int(code.rawValue), message: String(cString: curl_easy_strerror(code)), detail: detail)
    }
}
