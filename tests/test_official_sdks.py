"""The platforms' official Python SDKs work through the sidecar unchanged, with placeholder credentials."""

from __future__ import annotations

import asyncio
import json

import lark_oapi as lark
from alibabacloud_dingtalk.contact_1_0 import models as contact_models
from alibabacloud_dingtalk.contact_1_0.client import Client as ContactClient
from alibabacloud_dingtalk.oauth2_1_0 import models as oauth_models
from alibabacloud_dingtalk.oauth2_1_0.client import Client as OAuthClient
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_util import models as util_models
from lark_oapi.api.im.v1 import CreateMessageRequest, CreateMessageRequestBody

from tests.conftest import Platforms, Running


async def test_lark_oapi_sends_a_message_with_placeholder_credentials(sidecar: Running, platforms: Platforms) -> None:
    client = (lark.Client.builder().app_id("placeholder-app-id").app_secret("placeholder")
              .domain(sidecar.feishu_base).log_level(lark.LogLevel.ERROR).build())
    body = (CreateMessageRequestBody.builder().receive_id("oc_sdk").msg_type("text")
            .content(json.dumps({"text": "from lark-oapi"})).build())
    request = CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()
    response = await asyncio.to_thread(client.im.v1.message.create, request)
    assert response.success(), (response.code, response.msg)
    assert response.data.message_id.startswith("om_")
    assert platforms.feishu.messages[-1]["receive_id"] == "oc_sdk"
    assert platforms.feishu.calls[-1] == ("/open-apis/im/v1/messages", "t", True)   # the real token reached Feishu


def dingtalk_config(api_base: str) -> open_api_models.Config:
    host_port = api_base.removeprefix("http://")
    return open_api_models.Config(protocol="http", region_id="central", endpoint=host_port)


def call_dingtalk_sdk(api_base: str) -> tuple[str, str]:
    config = dingtalk_config(api_base)
    token = OAuthClient(config).get_access_token(
        oauth_models.GetAccessTokenRequest(app_key="placeholder", app_secret="placeholder")).body.access_token
    headers = contact_models.GetUserHeaders()
    headers.x_acs_dingtalk_access_token = token
    user = ContactClient(config).get_user_with_options("manager001", headers, util_models.RuntimeOptions())
    return token, user.body.nick


async def test_alibabacloud_dingtalk_calls_the_new_api_through_its_own_port(sidecar: Running,
                                                                          platforms: Platforms) -> None:
    token, nick = await asyncio.to_thread(call_dingtalk_sdk, sidecar.api_base)
    assert token == "imsidecar-managed"
    assert nick == "Zhang San"
    assert platforms.dingtalk.calls[-1] == ("/v1.0/contact/users/manager001", True)


async def test_each_sdk_can_shorten_the_sidecars_deadline_below_its_own_read_timeout(
        sidecar: Running, platforms: Platforms) -> None:
    """The README's snippets: X-Imsidecar-Timeout through lark-oapi's RequestOption headers and through the DingTalk
    SDK's common_headers. The platform hangs; each call ends as the sidecar's 504 rather than the SDK's timeout."""
    platforms.feishu.faults.hang_seconds = platforms.dingtalk.faults.hang_seconds = 1.0
    platforms.feishu.faults.script.append("hang")
    client = (lark.Client.builder().app_id("placeholder-app-id").app_secret("placeholder")
              .domain(sidecar.feishu_base).log_level(lark.LogLevel.ERROR).build())
    body = (CreateMessageRequestBody.builder().receive_id("oc_sdk").msg_type("text")
            .content(json.dumps({"text": "slow"})).build())
    request = CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()
    option = lark.RequestOption.builder().headers({"X-Imsidecar-Timeout": "300ms"}).build()
    response = await asyncio.to_thread(client.im.v1.message.create, request, option)
    assert response.code == 9990504, (response.code, response.msg)

    platforms.dingtalk.faults.script.append("hang")
    code = await asyncio.to_thread(dingtalk_with_deadline, sidecar.api_base, "300ms")
    assert code == "imsidecar.deadlineExceeded"


def dingtalk_with_deadline(api_base: str, deadline: str) -> str:
    from Tea.exceptions import TeaException

    headers = contact_models.GetUserHeaders(common_headers={"X-Imsidecar-Timeout": deadline})
    try:
        ContactClient(dingtalk_config(api_base)).get_user_with_options("manager001", headers, util_models.RuntimeOptions())
    except TeaException as exc:
        return str(exc.code)
    return "answered"
