"""citycard.v1.Applications: register plugins with their manifests, read registrations, rotate credentials."""

from __future__ import annotations

import logging

import grpc

from citycard.core.registry import Registry
from citycard.server import applications
from citycard.server.auth import OPERATOR, AppRecord, Principal
from citycard.server.common import Services, deadline_of, unary
from citycard.server.errors import FieldError, NotFound, PermissionDenied
from citycard.v1 import applications_pb2, applications_pb2_grpc

__all__ = ["ApplicationsService"]

log = logging.getLogger("citycard.server")


class ApplicationsService(applications_pb2_grpc.ApplicationsServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    @unary("Applications.RegisterApplication")
    async def RegisterApplication(self, request: applications_pb2.RegisterApplicationRequest,
                                  context: grpc.aio.ServicerContext,
                                  principal: Principal) -> applications_pb2.RegisterApplicationResponse:
        if not request.HasField("manifest"):
            raise FieldError("manifest", "is required")
        tls = self.services.auth.tls

        def register(registry: Registry) -> tuple[AppRecord, str | None, list[AppRecord]]:
            record, token = applications.register(registry, request.manifest, principal, tls=tls)
            return record, token, applications.load_applications(registry)

        record, token, apps = await self.services.writer.call(register, deadline=deadline_of(context))
        self.services.auth.publish(apps)
        log.info("application registered", extra={"application": record.name, "by": str(principal),
                                                  "ledgers": sorted(record.ledgers), "codes": sorted(record.codes)})
        return applications_pb2.RegisterApplicationResponse(
            application=applications.application_message(record), bearer_token=token or "")

    @unary("Applications.GetApplication")
    async def GetApplication(self, request: applications_pb2.GetApplicationRequest,
                             context: grpc.aio.ServicerContext,
                             principal: Principal) -> applications_pb2.GetApplicationResponse:
        name = request.name or (principal.app.name if principal.app else "")
        if principal.kind != OPERATOR and name != principal.name:
            raise PermissionDenied("an application reads its own registration only", field="name")
        record = self.services.auth.app(name)
        if record is None:
            raise NotFound(f"no application {name!r}", field="name")
        return applications_pb2.GetApplicationResponse(application=applications.application_message(record))

    @unary("Applications.ListApplications")
    async def ListApplications(self, request: applications_pb2.ListApplicationsRequest,
                               context: grpc.aio.ServicerContext,
                               principal: Principal) -> applications_pb2.ListApplicationsResponse:
        return applications_pb2.ListApplicationsResponse(
            applications=[applications.application_message(record) for record in self.services.auth.apps()])

    @unary("Applications.RotateCredential")
    async def RotateCredential(self, request: applications_pb2.RotateCredentialRequest,
                               context: grpc.aio.ServicerContext,
                               principal: Principal) -> applications_pb2.RotateCredentialResponse:
        def rotate(registry: Registry) -> tuple[str, list[AppRecord]]:
            _, token = applications.rotate_credential(registry, request.name, principal)
            return token, applications.load_applications(registry)

        token, apps = await self.services.writer.call(rotate, deadline=deadline_of(context))
        self.services.auth.publish(apps)
        log.info("application credential rotated", extra={"application": request.name, "by": str(principal)})
        return applications_pb2.RotateCredentialResponse(bearer_token=token)
