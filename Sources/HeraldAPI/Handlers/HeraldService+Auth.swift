import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    /// Password login. Every failure answers the same 401 (no hint whether the organisation,
    /// the email or the password was wrong) and takes about as long.
    func createToken(_ input: Operations.CreateToken.Input) async throws -> Operations.CreateToken.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let scope = try RequestScope.get()
        let account = LoginLimits.account(organisation: body.organisation, email: body.email)
        try loginLimits.check(account: account, address: scope.clientAddress, now: now())
        let refused = APIError.unauthorized("The organisation, email or password is not right.")

        var credentials: UserCredentials?
        let organisationID = try await database.organisationID(slug: body.organisation.lowercased())
        if let organisationID {
            credentials = try await transaction(in: organisationID) { tx in try await tx.credentials(email: body.email) }
        }
        let hash = credentials?.passwordHash ?? decoyHash
        // The account's attempt counts before the check, so that attempts sent together cannot
        // all pass the limit while each is checked; a success takes it back.
        loginLimits.recordAttempt(account: account, address: scope.clientAddress, now: now())
        let passwordMatches = try await passwords.verify(body.password, against: hash)
        guard let organisationID, let credentials, credentials.active, let verified = credentials.passwordHash, passwordMatches else {
            loginLimits.recordFailure(address: scope.clientAddress, now: now())
            scope.logger.notice("login refused", metadata: ["organisation": "\(body.organisation)"])
            throw refused
        }
        // A second transaction: the password check (about 0.2 s of argon2) holds no connection.
        // The user is held there and read again: a password changed or a user deactivated since
        // the check must not gain a session after the others were ended.
        let now = now()
        let pair: Components.Schemas.TokenPair? = try await transaction(in: organisationID, actor: .user(credentials.id)) { tx in
            guard let current = try await tx.holdUserCredentials(credentials.id), current.active, current.passwordHash == verified else {
                return nil
            }
            try await tx.recordEngagement(of: credentials.id, at: now) // a login is engagement
            return try await issuePair(tx, userID: credentials.id, familyID: UUID())
        }
        guard let pair else { throw refused }
        loginLimits.recordSuccess(account: account, address: scope.clientAddress)
        return .ok(.init(body: .json(pair)))
    }

    /// Refresh with rotation: each refresh token works once; a second use revokes its family.
    func refreshToken(_ input: Operations.RefreshToken.Input) async throws -> Operations.RefreshToken.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let refused = APIError.unauthorized("The refresh token is not valid.")
        guard let token = OpaqueToken(parsing: body.refreshToken, kind: .refresh) else { throw refused }
        let now = now()
        enum Outcome: Sendable { case rotate(Components.Schemas.TokenPair), reused(session: UUID), invalid }
        // Decide, record and issue in one transaction; a reuse must commit its revocation before refusing.
        let outcome: Outcome = try await transaction(in: token.organisationID) { tx in
            // The user first, then the token: the order in which a change of password, a reset
            // or a deactivation takes them, so the token this refresh issues is revoked with
            // the others, or the refresh finds its token revoked.
            guard let owner = try await tx.refreshTokenUser(token.id) else { return .invalid }
            _ = try await tx.holdUserCredentials(owner)
            guard let stored = try await tx.lockRefreshToken(token.id),
                constantTimeEqual(stored.secretHash, token.secretHash)
            else { return .invalid }
            if stored.usedAt != nil {
                try await tx.revokeRefreshFamily(stored.familyID, at: now)
                return .reused(session: stored.familyID)
            }
            guard stored.revokedAt == nil, stored.expiresAt > now,
                try await tx.grant(forUser: stored.userID) != nil
            else { return .invalid }
            try await tx.markRefreshTokenUsed(stored.id, at: now)
            return .rotate(try await issuePair(tx, userID: stored.userID, familyID: stored.familyID))
        }
        switch outcome {
        case .invalid:
            throw refused
        case .reused(let session):
            // The access tokens of the family stop at once here, on other instances within
            // HERALD_SESSION_CHECK_SECONDS.
            tokens.sessions.ended(session: session)
            try RequestScope.get().logger.warning("refresh token reused; family revoked", metadata: ["token_id": "\(token.id)"])
            throw refused
        case .rotate(let pair):
            return .ok(.init(body: .json(pair)))
        }
    }

    /// Ends the session the refresh token belongs to.
    func logout(_ input: Operations.Logout.Input) async throws -> Operations.Logout.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        guard let token = OpaqueToken(parsing: body.refreshToken, kind: .refresh) else {
            throw APIError.unauthorized("The refresh token is not valid.")
        }
        let now = now()
        let revoked: UUID? = try await transaction(in: token.organisationID) { tx in
            guard let stored = try await tx.lockRefreshToken(token.id),
                constantTimeEqual(stored.secretHash, token.secretHash)
            else { return nil }
            try await tx.revokeRefreshFamily(stored.familyID, at: now)
            return stored.familyID
        }
        guard let revoked else { throw APIError.unauthorized("The refresh token is not valid.") }
        // Its access tokens stop at once here; other instances hear it on the bus (SessionWatch).
        tokens.sessions.ended(session: revoked)
        return .noContent(.init())
    }

    /// A new access token and the next refresh token of `familyID`, recorded in `tx`.
    /// A session for a user, started by the caller's backend (the bell embedded in the tenant's
    /// product, whose users sign in there, not to Herald; a trial): the same session as a login
    /// makes. Needs every permission the user holds, as setting their password does, which gives
    /// the same power; a deactivated user gets none.
    func createUserSession(_ input: Operations.CreateUserSession.Input) async throws -> Operations.CreateUserSession.Output {
        let id = try id(input.path.userId, "user")
        let pair = try await tenant { tx, principal in
            try requireHolds(try await tx.permissions(ofUser: id).filter { !$0.concernsOnlyTheHolder }, principal)
            // Held to the commit: a deactivation or a password reset meanwhile ends this session too.
            guard let user = try await tx.holdUserCredentials(id) else { throw StoreError.notFound("user") }
            guard user.active else { throw APIError.conflict("The user is deactivated: reactivate them first.") }
            let family = UUID()
            let pair = try await issuePair(tx, userID: id, familyID: family)
            try await tx.audit(
                action: "user.session.start", targetType: "user", targetID: id.lowercased, before: nil,
                after: try auditValue(["session": JSONValue.string(family.lowercased)]))
            return pair
        }
        return .created(.init(body: .json(pair)))
    }

    private func issuePair(_ tx: TenantTransaction, userID: UUID, familyID: UUID) async throws -> Components.Schemas.TokenPair {
        let now = now()
        let refresh = OpaqueToken(kind: .refresh, organisationID: tx.organisationID)
        try await tx.insertRefreshToken(
            id: refresh.id, familyID: familyID, userID: userID, secretHash: refresh.secretHash,
            expiresAt: now.addingTimeInterval(refreshTokenTTL))
        let access = try await tokens.issueAccessToken(organisationID: tx.organisationID, userID: userID, sessionID: familyID, now: now)
        return .init(
            accessToken: access, tokenType: .bearer, expiresIn: tokens.accessTTL,
            refreshToken: refresh.text, refreshExpiresIn: Int(refreshTokenTTL))
    }
}

extension HeraldService {
    /// Changes the caller's own password, which needs the current one. The caller's other
    /// sessions end: someone who changes a password may fear it is known.
    func changeMyPassword(_ input: Operations.ChangeMyPassword.Input) async throws -> Operations.ChangeMyPassword.Output {
        let userID = try requireUser()
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let new = try Validate.password(body.newPassword, field: "new_password")
        let now = now()
        try loginLimits.checkPasswordChange(of: userID, now: now)
        // Counted before the check, so that tries sent together cannot all pass the limit.
        loginLimits.recordPasswordChange(of: userID, succeeded: false, now: now)
        let keeping: UUID? = if case .accessToken(let access) = try RequestScope.get().credential { access.sessionID } else { nil }
        let stored = try await tenant { tx, _ in try await tx.credentials(of: userID).credentials }
        guard let current = stored.passwordHash else {
            throw APIError.conflict(
                "You have no password to change (you were created without one): an administrator sets one with PUT /v1/users/{userId}/password."
            )
        }
        guard try await passwords.verify(body.currentPassword, against: current) else {
            throw APIError.refused("The current password is not right.")
        }
        loginLimits.recordPasswordChange(of: userID, succeeded: true, now: now)
        let hash = try await passwords.hash(new)
        let ended = try await tenant { tx, _ in
            guard try await tx.replacePasswordHash(userID, current, with: hash) else {
                throw APIError.conflict("Your password was changed by another request meanwhile; nothing was changed by this one.")
            }
            let ended = try await tx.revokeRefreshTokens(ofUser: userID, keeping: keeping, at: now)
            try await tx.audit(
                action: "user.password.change", targetType: "user", targetID: userID.lowercased, before: nil,
                after: try auditValue(["sessions_ended": ended.count]))
            return ended
        }
        // The user's sessions are asked of the database again here (the ended ones stop once
        // this commits; nothing is refused for good should it not); other instances hear the
        // revocations.
        if !ended.isEmpty { tokens.sessions.ended(user: userID, now: now) }
        return .noContent(.init())
    }
}
